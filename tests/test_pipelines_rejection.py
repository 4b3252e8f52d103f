"""Rejection sampling (jaxpost/pipelines/rejection_sampling.py) and the resumable store it runs on
(jaxpost/pipelines/common.py), on the tiny random Llama with the bundled tokenizer."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxpost
from jaxpost.pipelines import common, rejection_sampling as rs

ROOT = Path(__file__).resolve().parents[1]
REWARDS = """
def length(prompts, completions, **columns):
    return [float(len(c[0]["content"]) % 7) for c in completions]
"""


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("rs") / "len_reward.py"
  path.write_text(REWARDS)
  return f"{path}:length"


def tiny(workdir, reward_file, **overrides):
  c = jaxpost.configs.get("rejection_sampling:tiny")
  c.workdir = str(workdir)
  c.reward.funcs = reward_file
  c.pipeline.progress_bar = False
  c.report.task = ""
  c.train_after, c.rounds = False, 1
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


# ----------------------------------------------------------------------------- selection


def test_select_modes_by_hand():
  r = np.array([[0.5, 2.0, np.nan, 2.0, 1.0],
                [np.nan, np.nan, np.nan, np.nan, np.nan],
                [1.0, 1.0, 1.0, 1.0, 1.0]])
  texts = [["a", "b", "c", "b", "d"], ["x"] * 5, ["s", "s", "t", "s", "u"]]
  assert rs.select(r, "best") == [[1], [], [0]]
  assert rs.select(r, "top_k", k=3) == [[1, 3, 4], [], [0, 1, 2]]
  assert rs.select(r, "threshold", min_reward=1.0) == [[1, 3, 4], [], [0, 1, 2, 3, 4]]
  assert rs.select(r, "all_correct", k=0, min_reward=1.0, texts=texts) == [[1, 4], [], [0, 2, 4]]
  assert rs.select(r, "all_correct", k=2, min_reward=1.0, texts=texts)[2] == [0, 2]
  assert rs.select(r, "best", min_reward=3.0) == [[], [], []]
  assert rs.select(r, "pairs") == [[(1, 0)], [], []]  # ties skipped, NaN never picked
  curve = rs.reward_curve(r)
  assert curve["reward_max"] == pytest.approx((2.0 + 1.0) / 2)
  assert curve["reward_median"] == pytest.approx((1.5 + 1.0) / 2)


def test_bad_keys_fail_naming_them(tmp_path, reward_file):
  c = tiny(tmp_path, reward_file)
  c.selection.mdoe = "best"
  with pytest.raises(common.PipelineError, match="selection.mdoe.*selection.mode"):
    rs.run(c)
  c = tiny(tmp_path, reward_file, **{"selection.mode": "median"})
  with pytest.raises(common.PipelineError, match="selection.mode must be one of"):
    rs.run(c)
  c = tiny(tmp_path, reward_file, **{"selection.mode": "pairs", "train_after": True})
  with pytest.raises(common.PipelineError, match="configs/rejection_sampling.py:pairs"):
    rs.run(c)


# ----------------------------------------------------------------------------- store


def test_store_commit_point_is_the_state_file(tmp_path, monkeypatch):
  cfg = tiny(tmp_path, "x.py:f")
  store = common.UnitStore(tmp_path, cfg)
  store.commit("a", [{"x": 1}], {"kept": 1})
  real = common.atomic_write

  def dies_on_state(path, text):
    if Path(path).name == common.STATE_FILE:
      raise KeyboardInterrupt  # killed after the part was renamed, before the state was
    real(path, text)
  monkeypatch.setattr(common, "atomic_write", dies_on_state)
  with pytest.raises(KeyboardInterrupt):
    store.commit("b", [{"x": 2}], {"kept": 1})
  monkeypatch.setattr(common, "atomic_write", real)
  again = common.UnitStore(tmp_path, cfg)
  assert not again.done("b") and again.units() == ["a"]
  again.commit("b", [{"x": 3}], {"kept": 1})  # redone: the orphan part is overwritten
  assert again.export(tmp_path / "out.jsonl", again.units()) == 2
  assert common.read_jsonl(tmp_path / "out.jsonl") == [{"x": 1}, {"x": 3}]
  assert again.stats() == {"kept": 2}
  assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
  cfg.num_samples = 5
  with pytest.raises(common.PipelineError, match="num_samples: 4 -> 5"):
    common.UnitStore(tmp_path, cfg)


# ----------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, reward_file):
  """One round, selection best, no training: the reference for the resume test."""
  workdir = tmp_path_factory.mktemp("rs_best")
  report = rs.run(tiny(workdir, reward_file, **{"prompts_per_round": 12}))
  return workdir, report


def test_best_keeps_the_per_prompt_max(best_run):
  workdir, report = best_run
  rows = common.read_jsonl(workdir / "data.jsonl")
  rnd = report["rounds"][0]
  assert report["complete"] and len(rows) == rnd["prompts"] == 12 == rnd["kept"]
  kept = np.mean([r["reward"] for r in rows])
  assert kept == pytest.approx(rnd["reward_max"]) and kept >= rnd["reward_mean"]
  assert rnd["reward_max"] > rnd["reward_mean"]  # the rewards vary, so the test can fail
  assert all("answer" in r and r["completion"][0]["role"] == "assistant" for r in rows)
  manifest = json.loads((workdir / "manifest.json").read_text())
  assert manifest["counts"]["samples"] == 48 and manifest["rows"] == 12
  assert manifest["versions"]["jax"] and manifest["config"]["num_samples"] == 4


def test_killed_run_resumes_to_identical_rows(tmp_path, best_run, reward_file, monkeypatch):
  ref_dir, _ = best_run
  c = tiny(tmp_path, reward_file, **{"prompts_per_round": 12})
  real, calls = common.UnitStore.commit, []

  def killed_after_one(self, unit, rows, stats=None, info=None):
    calls.append(unit)
    if len(calls) == 2:
      raise KeyboardInterrupt  # the process dies in the middle of the round
    real(self, unit, rows, stats, info)
  monkeypatch.setattr(common.UnitStore, "commit", killed_after_one)
  with pytest.raises(KeyboardInterrupt):
    rs.run(c)
  monkeypatch.setattr(common.UnitStore, "commit", real)
  assert json.loads((tmp_path / "state.json").read_text())["order"] == ["r0/u00000"]
  assert not (tmp_path / "data.jsonl").exists()
  rs.run(tiny(tmp_path, reward_file, **{"prompts_per_round": 12}))
  assert (tmp_path / "data.jsonl").read_text() == (ref_dir / "data.jsonl").read_text()


def test_max_rows_bound_then_continue(tmp_path, reward_file):
  c = tiny(tmp_path, reward_file, **{"prompts_per_round": 12, "pipeline.max_rows": 4})
  first = rs.run(c)
  assert not first["complete"] and "max_rows" in first["stopped"]
  assert len(common.read_jsonl(tmp_path / "data.jsonl")) == 4
  again = rs.run(tiny(tmp_path, reward_file, **{"prompts_per_round": 12}))
  assert again["complete"] and len(common.read_jsonl(tmp_path / "data.jsonl")) == 12


def test_pairs_train_dpo_on_chosen_vs_rejected(tmp_path, reward_file):
  c = tiny(tmp_path, reward_file, **{"train_after": True, "report.task": "auto",
                                     "report.examples": 4})
  c.selection.mode = "pairs"
  c.train = jaxpost.configs.get("dpo:tiny")
  c.train.max_steps, c.train.batch_size, c.train.eval_at_start = 1, 2, False
  c.train.data.cache, c.train.report.task = False, ""
  assert jaxpost.configs.get("rejection_sampling:pairs").train.algorithm == "dpo"
  report = rs.run(c)
  pool = common.read_jsonl(tmp_path / "round_0" / "pool.jsonl")
  assert pool and all(p["chosen_reward"] > p["rejected_reward"] for p in pool)
  assert len(pool) == report["rounds"][0]["kept"] <= 8  # at most one pair per prompt
  assert (tmp_path / "round_0" / "train" / "hf" / "config.json").exists()
  assert math.isfinite(report["rounds"][0]["accuracy"]) and report["base_accuracy"] is not None


def test_cli_locked_config_and_typo():
  out = subprocess.run([sys.executable, "scripts/pipeline.py",
                        "--config=configs/rejection_sampling.py:tiny", "--config.rounds_=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert out.returncode == 1 and "unknown config key 'rounds_'; did you mean rounds?" in out.stderr


def test_two_sft_rounds_write_two_pools_and_train_twice(tmp_path, reward_file):
  c = tiny(tmp_path, reward_file, **{"train_after": True, "rounds": 2, "restart_from": "base",
                                     "pool": "this_round", "train.max_steps": 1,
                                     "train.data.cache": False})
  report = rs.run(c)
  state = json.loads((tmp_path / "state.json").read_text())["units"]
  for r in (0, 1):
    assert common.read_jsonl(tmp_path / f"round_{r}" / "pool.jsonl")
    assert (tmp_path / f"round_{r}" / "train" / "hf" / "config.json").exists()
  assert state["r1/u00000"] != state["r0/u00000"]
  base = str(tmp_path / "base_model")
  assert [state[f"r{r}/train"]["info"]["start_from"] for r in (0, 1)] == [base, base]
  assert report["rounds"][1]["pool"] == report["rounds"][1]["kept"]  # this_round
  # round 2 sampled from round 1's export, then trained the base on its own pool
  assert common.read_jsonl(tmp_path / "data.jsonl") == common.read_jsonl(
      tmp_path / "round_1" / "pool.jsonl")


def test_reward_model_scores_rows_as_one_unpadded_forward(tmp_path):
  import ml_collections
  from jaxpost.train import sharding as sh
  from jaxpost.train.state import load_sharded
  c = tiny(tmp_path / "run", "", **{"prompts_per_round": 4})
  mesh = sh.build_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
  rm = load_sharded(c.model, mesh, sh.rules_of({}), head="score", seed=3)
  jaxpost.save_model(rm, str(tmp_path / "rm"))
  c.reward.model, c.reward.model_weight = str(tmp_path / "rm"), 2.0
  scorer = common.TextScorer.from_config(c, rm.config.vocab_size)
  rows = [[5, 6, 7], list(range(10, 40)), [9]]
  got = scorer._model_scores(rows, batch=2)
  rm = jaxpost.load_model(str(tmp_path / "rm"), head="score")
  for r, value in zip(rows, got):
    out = rm.model.apply({"params": rm.params}, np.asarray([r]), np.ones((1, len(r)), np.int32))
    assert value == pytest.approx(float(np.asarray(out)[0, -1]), abs=1e-5)
  assert scorer(["p"] * 3, ["a", "b", "c"], {}, rows) == pytest.approx(2.0 * got)
  report = rs.run(c)
  kept = [r["reward"] for r in common.read_jsonl(tmp_path / "run" / "data.jsonl")]
  assert len(kept) == 4 and np.mean(kept) == pytest.approx(report["rounds"][0]["reward_max"])


def test_train_recipe_typo_fails(tmp_path, reward_file):
  c = tiny(tmp_path, reward_file)
  c.train.optimizer.learnin_rate = 1e-3
  with pytest.raises(common.PipelineError, match="train.optimizer.learnin_rate.*learning_rate"):
    rs.run(c)


def test_per_round_temperatures(tmp_path, reward_file):
  c = tiny(tmp_path, reward_file, **{"rounds": 2})
  c.temperatures = [0.3, 1.1]
  assert rs.Settings.of(c).temperatures == (0.3, 1.1)
  c.temperatures = [0.3]
  with pytest.raises(common.PipelineError, match="temperatures has 1 values for config.rounds=2"):
    rs.Settings.of(c)
