"""Recipes and the CLI: a locked config rejects unknown keys by name; variants are checked."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from jaxpost.configs import base, sft  # noqa: E402

from jaxpost.train import algorithms  # noqa: E402

DESIGN_KEYS = ("workdir", "seed", "max_steps", "batch_size", "log_every", "eval_every",
               "model.name_or_path", "model.dtype", "data.train", "data.eval", "data.max_length",
               "optimizer.learning_rate", "checkpoint.every", "checkpoint.keep", "mesh.data",
               "mesh.fsdp", "mesh.tensor", "grad_accum", "logprob_chunk_size", "export_hf")


def _has(config, dotted):
  for part in dotted.split("."):
    if part not in config:
      return False
    config = config[part]
  return True


@pytest.mark.parametrize("variant", [None, "tiny", "synthetic"])
def test_recipes_have_the_documented_keys(variant):
  config = sft.get_config(variant)
  missing = [k for k in DESIGN_KEYS if not _has(config, k)]
  assert not missing
  assert config.algorithm == "sft" and algorithms.get(config.algorithm).loader_kind == "sft"
  assert set(base.get_config().keys()) <= set(config.keys())


def test_unknown_variant_and_algorithm_fail_clearly():
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    sft.get_config("huge")
  with pytest.raises(ValueError, match="'nope' is not a registered algorithm"):
    algorithms.get("nope")


def test_cli_rejects_unknown_key_naming_it():
  proc = subprocess.run(
      [sys.executable, "scripts/train.py", "--config=configs/sft.py:synthetic",
       "--config.not_a_key=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "not_a_key" in proc.stderr
  assert "unknown config key" in proc.stderr and "Traceback" not in proc.stderr
