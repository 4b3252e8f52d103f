"""Recipes and the CLI: a locked config rejects unknown keys by name (and suggests the nearest),
`--help` lists the keys, every bad value fails naming its key before anything loads."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import jaxpost  # noqa: E402
from jaxpost import configs  # noqa: E402
from jaxpost.configs import base, keys, sft  # noqa: E402
from jaxpost.train import algorithms  # noqa: E402
from jaxpost.train.validate import ConfigError, check  # noqa: E402

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
  proc = _cli("--config=configs/sft.py:synthetic", "--config.not_a_key=1")
  assert proc.returncode != 0
  assert "not_a_key" in proc.stderr
  assert "unknown config key" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------- checks up front (item 7)

def _set(config, dotted, value):
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  with node.ignore_type():
    setattr(node, leaf, value)


BAD_VALUES = [  # (recipe, key, value, what the error must say)
    ("sft:tiny", "batch_size", 0, "config.batch_size=0 must be >= 1"),
    ("sft:tiny", "grad_accum", 0, "config.grad_accum=0 must be >= 1"),
    ("sft:tiny", "grad_accum", 3, "config.batch_size=8 is not divisible by config.grad_accum=3"),
    ("sft:tiny", "max_steps", -5, "config.max_steps=-5 must be >= 1"),
    ("sft:tiny", "num_epochs", -1.0, "config.num_epochs=-1.0 must be >= 0"),
    ("sft:tiny", "eval_batches", 0, "config.eval_batches=0 must be >= 1"),
    ("sft:tiny", "optimizer.learning_rate", -1e-3, "config.optimizer.learning_rate=-0.001"),
    ("sft:tiny", "optimizer.learning_rate", 0.0, "config.optimizer.learning_rate=0.0"),
    ("sft:tiny", "optimizer.name", "adam", "config.optimizer.name='adam'; choose one of"),
    ("sft:tiny", "optimizer.schedule", "cos", "config.optimizer.schedule='cos'"),
    ("sft:tiny", "optimizer.warmup_ratio", 1.5, "config.optimizer.warmup_ratio=1.5"),
    ("sft:tiny", "model.dtype", "float33", "config.model: Unknown dtype 'float33'"),
    ("sft:tiny", "model.param_dtype", "float33", "config.model: Unknown param_dtype"),
    ("sft:tiny", "model.remat_policy", "some", "config.model: Unknown remat_policy 'some'"),
    ("sft:tiny", "data.train_on", "everything", "config.data.train_on='everything'"),
    ("sft:tiny", "data.truncation_mode", "middle", "data.truncation_mode='middle'"),
    ("sft:tiny", "data.max_length", 0, "config.data.max_length=0"),
    ("sft:tiny", "data.max_prompt_length", 96, "config.data.max_prompt_length=96"),
    ("sft:tiny", "data.eval_fraction", 1.0, "config.data.eval_fraction=1.0"),
    ("sft:tiny", "data.train", None, "No data source: set config.data.train"),
    ("sft:tiny", "lora.rank", -1, "config.lora.rank=-1"),
    ("sft:tiny", "lora.dropout", 1.5, "config.lora.dropout=1.5"),
    ("sft:tiny", "lora.targets", "(", "config.lora.targets='(' is not a regex"),
    ("sft:tiny", "report.task", "algebra", "config.report.task='algebra'"),
    ("sft:tiny", "algorithm", "a2c", "config.algorithm='a2c' is not a registered algorithm"),
    ("sft:tiny", "neftune_alpha", -1.0, "config.neftune_alpha=-1.0"),
    ("sft:tiny", "mesh.data", 3, "config.mesh"),
    ("dpo:tiny", "loss_type", "sigmod", "config.loss_type must be one of"),
    ("dpo:tiny", "beta", 0.0, "config.beta must be > 0"),
    ("dpo:tiny", "label_smoothing", 0.6, "config.label_smoothing"),
    ("dpo:tiny", "loss_type", "kto", "config.loss_type='kto' trains on unpaired rows"),
    ("dpo:tiny", "ref.name_or_path", "/no/such/model", "config.ref.name_or_path='/no/such/model'"),
    ("dpo:kto", "data.packing", True, "config.data.packing is for SFT batches and prefix-shared"),
    ("dpo:kto", "loss_type", "sigmoid", "config.algorithm='kto' needs config.loss_type='kto'"),
    ("rm:tiny", "data.train", "synthetic", "only provides 'sft' batches"),
]


@pytest.mark.parametrize("recipe,key,value,message", BAD_VALUES,
                         ids=[f"{r}-{k}={v}" for r, k, v, _ in BAD_VALUES])
def test_bad_value_fails_naming_the_key(recipe, key, value, message, tmp_path):
  config = configs.get(recipe)
  config.workdir = str(tmp_path / "run")
  check(config, num_devices=1)  # the recipe itself is valid
  _set(config, key, value)
  with pytest.raises(ConfigError, match=re.escape(message)):
    check(config, num_devices=1)


def test_microbatches_must_split_over_the_data_parallel_devices(tmp_path):
  config = configs.get("sft:tiny")
  config.workdir = str(tmp_path)
  config.batch_size, config.grad_accum = 8, 4
  check(config, num_devices=2)
  with pytest.raises(ConfigError, match=r"config.batch_size=8 / config.grad_accum=4 = 2 rows per "
                                        r"microbatch, not divisible by the 4 data-parallel"):
    check(config, num_devices=4)
  config.mesh.data, config.mesh.tensor = 2, 2  # 2 data-parallel devices x 2 tensor-parallel
  check(config, num_devices=4)


def test_workdir_must_be_writable(tmp_path):
  config = configs.get("sft:tiny")
  (tmp_path / "file").write_text("x")
  config.workdir = str(tmp_path / "file" / "run")
  with pytest.raises(ConfigError, match="config.workdir=.*is not a directory"):
    check(config, num_devices=1)
  config.workdir = str(tmp_path / "new" / "deeper")  # created later: fine
  check(config, num_devices=1)


def test_train_checks_before_loading_anything(tmp_path):
  """jaxpost.train fails on the bad key before a model or data load writes anything."""
  config = configs.get("dpo:tiny")
  config.workdir = str(tmp_path / "run")
  config.model.name_or_path = str(tmp_path / "no_model_here")
  config.optimizer.learning_rate = -1.0
  with pytest.raises(ConfigError, match="config.optimizer.learning_rate=-1.0"):
    jaxpost.train(config)
  assert not (tmp_path / "run").exists()


def _cli(*args):
  return subprocess.run([sys.executable, "scripts/train.py", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_cli_bad_value_fails_in_one_line(tmp_path):
  proc = _cli("--config=configs/sft.py:tiny", "--config.model.dtype=float33",
              f"--config.workdir={tmp_path}")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "train.py: config.model: Unknown dtype 'float33'" in proc.stderr


# ----------------------------------------------------------------- unknown keys, --help (item 8)

def test_nearest_keys_look_anywhere_in_the_tree():
  known = keys.flatten(configs.get("dpo"))
  assert keys.nearest_keys("learning_rate", known) == ["optimizer.learning_rate"]
  assert keys.nearest_keys("optimizer.learnin_rate", known)[0] == "optimizer.learning_rate"
  assert keys.nearest_keys("lora.rnak", known)[0] == "lora.rank"
  assert keys.nearest_keys("max_prompt_len", known)[0] == "data.max_prompt_length"
  assert keys.nearest_keys("zzz", known) == []


def test_cli_unknown_key_suggests_the_nearest_key():
  proc = _cli("--config=configs/sft.py:synthetic", "--config.learning_rate=1e-3")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert ("train.py: unknown config key 'learning_rate'; did you mean optimizer.learning_rate?"
          in proc.stderr)
  assert "\\'" not in proc.stderr and "\\n" not in proc.stderr


def test_cli_renamed_and_trl_keys_name_ours():
  proc = _cli("--config=configs/sft.py:synthetic", "--config.eval_steps=2")
  assert proc.returncode != 0
  assert "unknown config key 'eval_steps'; use eval_every" in proc.stderr
  assert "eval_batches" in proc.stderr


def test_cli_help_lists_the_recipe_keys_with_docs():
  proc = _cli("--config=configs/dpo.py:tiny", "--config.beta=0.3", "--help")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  docs = keys.all_docs()
  for key in ("eval_batches", "num_epochs", "loss_type", "data.eval_fraction", "lora.rank"):
    row = next(i for i, line in enumerate(lines) if line.startswith(f"  {key} "))
    assert docs[key].split()[0] in lines[row + 1]  # the doc follows its key
  assert any(line.startswith("  beta ") and line.endswith("= 0.3") for line in lines)


def test_docs_are_in_the_recipe_docstrings():
  from jaxpost.configs import base, dpo
  assert "eval_batches" in base.__doc__ and "num_epochs" in base.__doc__
  assert "precompute_ref" in dpo.__doc__ and "Keys added to configs/base.py" in dpo.__doc__


# ----------------------------------------------------------------- num_epochs (item 17)

def test_num_epochs_sets_the_steps_from_the_epoch_size(tmp_path):
  from jaxpost.data.loader import build_loader
  from jaxpost.hf import load_tokenizer, resolve_model_dir
  tokenizer = load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))
  data = configs.get("sft:tiny").data
  _set(data, "train", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)])
  loader = build_loader(data, tokenizer, "sft", batch_size=4, seed=0)
  assert loader.steps_for(1.0) == 3 and loader.steps_for(2.5) == 7 and loader.epoch == 0.0
  loader.prefetch = 0
  for _ in range(3):
    next(loader)
  assert loader.epoch == pytest.approx(12 / 10)
