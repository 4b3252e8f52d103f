"""configs/rlhf.py + jaxpost/rlhf.py: SFT -> reward model -> PPO on a tiny random model, each
stage in its own workdir, the later ones starting from the earlier exports; a rerun skips all."""

import json

import pytest

from jaxpost import rlhf
from jaxpost.configs import rlhf as rlhf_config

QUIET = {"metrics.progress_bar": False, "metrics.tensorboard": False, "eval_at_start": False,
         "report.task": "", "data.eval": "", "checkpoint.async_save": False}


def tiny_pipeline(tmp_path, **top):
  c = rlhf_config.get_config("tiny")
  c.workdir = str(tmp_path / "rlhf")
  for stage, steps in (("sft", 1), ("rm", 1), ("ppo", 1)):
    c.stages[stage].update_from_flattened_dict({**QUIET, "max_steps": steps})
  c.update(top)
  return c


def test_three_stages_chain_and_rerun_skips(tmp_path):
  c = tiny_pipeline(tmp_path)
  stages = rlhf.stage_configs(c)
  assert stages["rm"].model.name_or_path == str(tmp_path / "rlhf" / "sft" / "hf")
  assert stages["ppo"].reward.model == str(tmp_path / "rlhf" / "rm" / "hf")
  assert stages["ppo"].reward.funcs == "" and stages["ppo"].ref.name_or_path == ""
  first = rlhf.run(c)
  assert [first[s]["complete"] for s in ("sft", "rm", "ppo")] == [False] * 3
  ppo_rows = [json.loads(l) for l in open(tmp_path / "rlhf" / "ppo" / "metrics.jsonl")]
  train = [r for r in ppo_rows if "loss" in r]
  assert len(train) == 1 and "rewards/reward_model/mean" in train[0]
  assert train[0]["objective/scores"] == pytest.approx(train[0]["rewards/reward_model/mean"],
                                                      rel=1e-6)
  again = rlhf.run(c)
  assert all(again[s]["complete"] for s in ("sft", "rm", "ppo"))


def test_own_models_replace_stages(tmp_path):
  c = tiny_pipeline(tmp_path, sft_model="/models/my_sft", reward_model="/models/my_rm")
  stages = rlhf.stage_configs(c)
  assert list(stages) == ["ppo"]
  assert stages["ppo"].model.name_or_path == "/models/my_sft"
  assert stages["ppo"].reward.model == "/models/my_rm"
