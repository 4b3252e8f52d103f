"""GRPO and RLOO on the one loop, on a tiny random model with the bundled tokenizer.

A random model never answers arithmetic, so the runs reward completion LENGTH (a reward file
written here, loaded as `path.py:fn` like a user's): lengths vary within a group, so advantages
and gradients are non-zero. The math itself is checked by hand in test_losses_grpo.py.
"""

import json

import jax
import numpy as np
import pytest

import jaxpost
from jaxpost.hf import LoadedModel, build_module, load_tokenizer, read_hf_config, save_model
from jaxpost.models.config import LlamaConfig
from jaxpost.models.llama import init_params
from jaxpost.rewards import RewardError
from jaxpost.train.checkpoint import Checkpointer
from jaxpost.train.validate import ConfigError
from tests.conftest import run_on_fake_devices

REWARDS = '''
import os
CALLS = [0]

def length_reward(prompts, completions, answer, **columns):
    assert len(answer) == len(completions)            # the prompt rows' columns arrive
    return [float(len(c[0]["content"])) / 10 for c in completions]

def fails_on_third_call(prompts, completions, **columns):
    CALLS[0] += 1
    if CALLS[0] == 3:
        raise ZeroDivisionError("boom")
    return [1.0 if len(c[0]["content"]) % 2 else 0.0 for c in completions]
'''

TRL_KEYS = ("reward", "reward_std", "rewards/length_reward/mean", "rewards/length_reward/std",
            "frac_reward_zero_std", "completions/mean_length", "completions/min_length",
            "completions/max_length", "completions/clipped_ratio", "entropy",
            "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
            "sampling/logp_difference/mean", "sampling/logp_difference/max", "time/rollout",
            "time/update", "mfu/rollout", "mfu/update")


def tiny_config(tmp_path, recipe="grpo:tiny", name="run", fn="length_reward", **overrides):
  rewards = tmp_path / "my_rewards.py"
  rewards.write_text(REWARDS)
  c = jaxpost.configs.get(recipe)
  c.update_from_flattened_dict({
      "workdir": str(tmp_path / name), "reward.funcs": f"{rewards}:{fn}",
      "metrics.progress_bar": False, "metrics.tensorboard": False, "eval_at_start": False,
      "report.task": "", "checkpoint.async_save": False, **overrides})
  return c


def records(workdir):
  return [r for r in map(json.loads, open(f"{workdir}/metrics.jsonl")) if "loss" in r]


def latest_checkpoint(workdir):
  ckpt = Checkpointer(str(workdir), read_only=True)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def test_grpo_metrics_ratio_one_and_resume_bitwise(tmp_path):
  """μ = 1: no clipping ever (ρ ≡ 1), TRL's metric names, and 4 straight iterations == 2,
  then a resumed run to 4 (the rollout RNG comes from the restored state)."""
  straight = jaxpost.train(tiny_config(tmp_path, name="straight", max_steps=4,
                                       **{"checkpoint.every": 2}))
  assert straight["step"] == 4 and not straight["preempted"]
  rows = records(tmp_path / "straight")
  assert len(rows) == 4
  for key in TRL_KEYS:
    assert all(np.isfinite(r[key]) for r in rows), key
  assert all(r["clip_ratio/region_mean"] == 0.0 for r in rows)
  assert all(r["grad_norm"] > 0 for r in rows)  # length rewards vary: a real signal
  assert all(r["sampling/logp_difference/max"] < 1e-4 for r in rows)
  assert max(r["completions/max_length"] for r in rows) <= 6
  jaxpost.train(tiny_config(tmp_path, name="resumed", max_steps=2))
  jaxpost.train(tiny_config(tmp_path, name="resumed", max_steps=4))
  resumed = records(tmp_path / "resumed")
  assert [r["step"] for r in resumed] == [1, 2, 3, 4]
  for a, b in zip(rows, resumed):
    for key in ("loss", "reward", "grad_norm", "completions/mean_length", "entropy"):
      assert a[key] == b[key], (a["step"], key, a[key], b[key])


def test_grpo_second_pass_clips_and_counts_updates(tmp_path):
  """μ = 2 over 2 minibatches = 4 updates per iteration: the passes after the first see ρ != 1
  and clip (a large learning rate moves the policy), and the schedule counts updates."""
  c = tiny_config(tmp_path, max_steps=2, **{
      "grpo.num_iterations": 2, "grpo.num_minibatches": 2, "optimizer.learning_rate": 3e-2,
      "checkpoint.every": 0})
  jaxpost.train(c)
  rows = records(tmp_path / "run")
  assert max(r["clip_ratio/region_mean"] for r in rows) > 0
  assert latest_checkpoint(tmp_path / "run") == 2
  assert restored_updates(tmp_path / "run", c) == 2 * 4


def restored_updates(workdir, c):
  """TrainState.step (optimiser updates) of the run's latest checkpoint, restored."""
  from jaxpost.train import algorithms
  from jaxpost.train import sharding as sh
  from jaxpost.train.optim import build_optimizer
  from jaxpost.train.state import abstract_train_state, model_config
  cfg, _ = model_config(c.model, c.model.name_or_path)
  mesh = sh.build_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  tx, _ = build_optimizer(c.optimizer, c.max_steps)
  abstract = abstract_train_state(build_module(cfg, "lm"), tx, mesh, sh.rules_of(c.mesh),
                                  algorithms.get(c.algorithm).init_extra(c))
  ckpt = Checkpointer(str(workdir), read_only=True)
  try:
    state, _, _ = ckpt.restore(ckpt.latest_step(), abstract)
  finally:
    ckpt.close()
  return int(jax.device_get(state.step))


@pytest.fixture(scope="module")
def reward_model_dir(bundled_dir, tmp_path_factory):
  """A random tiny score model on the bundled tokenizer, saved as an HF checkpoint."""
  tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16)
  cfg = LlamaConfig.from_hf({**read_hf_config(bundled_dir), **tiny})
  module = build_module(cfg, "score")
  params = jax.jit(lambda key: init_params(module, key))(jax.random.PRNGKey(3))
  params["score"]["kernel"] = params["score"]["kernel"] * 50  # scores of order 1
  out = tmp_path_factory.mktemp("rm") / "hf"
  save_model(LoadedModel(module, params, load_tokenizer(bundled_dir), cfg, "score"), str(out))
  return str(out)


def test_rloo_with_reference_and_reward_model(tmp_path, reward_model_dir):
  """RLOO with β > 0 (reference = initial policy: kl is logged, 0 at the first iteration) and a
  reward model scored in-graph next to a reward function."""
  c = tiny_config(tmp_path, recipe="rloo:tiny", max_steps=2, **{
      "rloo.beta": 0.1, "reward.model": reward_model_dir, "checkpoint.every": 0})
  jaxpost.train(c)
  rows = records(tmp_path / "run")
  assert abs(rows[0]["kl"]) < 1e-6
  assert all(np.isfinite(r["rewards/reward_model/mean"]) for r in rows)
  assert all(r["rewards/reward_model/std"] > 0 for r in rows)
  assert all(r["grad_norm"] > 0 for r in rows)


def test_failing_reward_function_names_it_and_keeps_the_checkpoint(tmp_path):
  c = tiny_config(tmp_path, fn="fails_on_third_call", max_steps=4, **{"checkpoint.every": 1})
  with pytest.raises(RewardError, match=r"fails_on_third_call.*ZeroDivisionError: boom"):
    jaxpost.train(c)
  assert latest_checkpoint(tmp_path / "run") == 2
  assert restored_updates(tmp_path / "run", c) == 2  # the step-2 checkpoint restores whole


@pytest.mark.parametrize("bad, message", [
    ({"grpo.num_minibatches": 3}, r"config.batch_size=4 prompts x config.grpo.num_generations=4"),
    ({"reward.funcs": ""}, r"needs a reward: set config.reward.funcs"),
    ({"grpo.loss_type": "ppo"}, r"config.grpo.loss_type must be one of"),
    ({"grpo.num_iterations": 0}, r"config.grpo.num_iterations must be >= 1"),
])
def test_bad_keys_fail_before_any_model_loads(tmp_path, bad, message):
  with pytest.raises((ValueError, ConfigError), match=message):
    jaxpost.train(tiny_config(tmp_path, **bad))


FAKE_DEVICES = """
import json, sys
sys.path.insert(0, "tests")
import jaxpost
from test_grpo import tiny_config, records
from pathlib import Path
tmp = Path({tmp!r})
c = tiny_config(tmp, name="mesh", max_steps=2, **{{"mesh.data": 2, "mesh.fsdp": 2,
                                                  "mesh.tensor": 2, "checkpoint.every": 0}})
jaxpost.train(c)
print("OK")
"""


def test_eight_fake_devices_match_one(tmp_path):
  """data=2 x fsdp=2 x tensor=2 samples the same completions and takes the same updates."""
  jaxpost.train(tiny_config(tmp_path, name="one", max_steps=2, **{"checkpoint.every": 0}))
  run_on_fake_devices(FAKE_DEVICES.format(tmp=str(tmp_path)), devices=8)
  for a, b in zip(records(tmp_path / "one"), records(tmp_path / "mesh")):
    assert a["completions/mean_length"] == b["completions/mean_length"]
    np.testing.assert_allclose(a["reward"], b["reward"], rtol=1e-6)
    # rtol 1e-3: the sums' order differs across devices, and Adam turns that noise into
    # lr-sized steps on coordinates whose gradient is ~0, which step 2's grad_norm shows.
    for key in ("loss", "grad_norm", "entropy", "param_norm"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-6, err_msg=key)
