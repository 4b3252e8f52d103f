"""DPO and reward-model runs through the real training loop on a separable toy set.

A tiny random Llama (configs/<recipe>.py:tiny, bundled tokenizer) sees pairs whose chosen answer
is always "yes" and rejected always "no": the first step is the untrained policy (= reference),
and a few steps must separate every pair.
"""

import json

import numpy as np
import pytest

import jaxpost
from jaxpost.configs import dpo, rm
from jaxpost.data.loader import build_loader
from jaxpost.data.tasks import arithmetic

ROWS = [{"prompt": f"Question {i}: is {i} a number?", "chosen": "yes", "rejected": "no"}
        for i in range(16)]


def run(config, tmp_path):
  config.workdir = str(tmp_path)
  config.data.train = config.data.eval = None
  config.max_steps, config.log_every, config.eval_batches = 12, 1, 1
  config.checkpoint.every = -1
  config.metrics.tensorboard = config.metrics.progress_bar = False
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule = "constant"
  lm = jaxpost.load_model(config.model.name_or_path, tokenizer=True)
  data = config.data.copy_and_resolve_references()
  data.train = ROWS
  loader = build_loader(data, lm.tokenizer, "preference", config.batch_size, seed=0)
  jaxpost.train(config, train_loader=loader)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow
def test_dpo_run_starts_at_log2_and_separates_pairs(tmp_path):
  records = run(dpo.get_config("tiny"), tmp_path)
  first, last = records[0], records[-1]
  assert first["step"] == 1
  assert first["loss"] == pytest.approx(np.log(2), rel=1e-5)
  assert first["rewards/accuracies"] == 0.0
  assert last["rewards/accuracies"] == 1.0 and last["loss"] < 0.7 * first["loss"]


@pytest.mark.slow
def test_reward_model_run_separates_pairs(tmp_path):
  records = run(rm.get_config("tiny"), tmp_path)
  assert records[-1]["accuracy"] == 1.0
  assert records[-1]["loss"] < 0.7 * records[0]["loss"]


@pytest.fixture
def small_arithmetic(monkeypatch):
  """builtin:arithmetic with 24 training questions (the reference scores the whole table)."""
  arithmetic.questions.cache_clear()
  monkeypatch.setattr(arithmetic, "TRAIN_SIZE", 24)
  yield
  arithmetic.questions.cache_clear()


@pytest.mark.slow
def test_precomputed_reference_run_matches_on_the_fly(tmp_path, small_arithmetic):
  """Same run twice, reference scored per step vs once up front: identical metrics; the cache
  file is written to the workdir."""
  def records(precompute, workdir):
    config = dpo.get_config("tiny")
    config.workdir, config.precompute_ref = str(workdir), precompute
    config.data.eval, config.report.task = None, ""
    config.max_steps, config.log_every, config.batch_size = 4, 1, 4
    config.checkpoint.every = -1
    config.metrics.tensorboard = config.metrics.progress_bar = False
    jaxpost.train(config)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]

  cached = records(True, tmp_path / "cached")
  live = records(False, tmp_path / "live")
  assert list((tmp_path / "cached" / "ref_logps").glob("*.npz"))
  assert live[-1]["rewards/margins"] != 0.0
  for a, b in zip(cached, live):
    for key in ("loss", "rewards/margins", "logps/chosen"):
      assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6)
