"""One data-source surface on every recipe: a path from the CLI, rows or a Dataset from Python."""

import json
import os
import subprocess
import sys

import datasets
import pytest

import jaxpost.configs
from jaxpost.data import build_loader
from jaxpost.data.tasks import task_rows
from jaxpost.hf import load_tokenizer, resolve_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [{"prompt": f"What is {i} + 1?", "chosen": f" {i + 1}", "rejected": f" {i + 2}",
         "margin": 0.5} for i in range(8)]


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))


@pytest.mark.parametrize("recipe", ["sft", "rm", "dpo"])
def test_every_recipe_takes_a_string_source(recipe):
  c = jaxpost.configs.get(f"{recipe}:tiny")
  assert isinstance(c.data.train, str) and c.data.train.startswith("builtin:")
  c.data.train = "data/x.jsonl"
  assert c.data.train == "data/x.jsonl"


@pytest.mark.parametrize("make", [lambda: list(ROWS), lambda: datasets.Dataset.from_list(ROWS),
                                  lambda: {"rows": ROWS, "weight": 2.0},
                                  lambda: [{"rows": ROWS[:4]}, {"rows": ROWS[4:], "weight": 3}]],
                         ids=["rows", "dataset", "spec", "mixture"])
def test_python_sources_on_a_recipe_config(tok, tmp_path, make):
  c = jaxpost.configs.get("rm:tiny")
  c.data.train = make()  # no ignore_type() needed
  c.data.cache_dir = str(tmp_path)
  loader = build_loader(c.data, tok, "preference", 4, process_index=0, process_count=1)
  assert loader.summary["examples"] == 8
  assert float(next(loader)["margin"][0]) == 0.5
  loader.close()


def test_rm_cli_takes_a_data_file(tmp_path):
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  proc = subprocess.run(
      [sys.executable, "scripts/train.py", "--config=configs/rm.py:tiny",
       f"--config.data.train={path}", f"--config.workdir={tmp_path / 'run'}",
       "--config.max_steps=2", "--config.batch_size=4", "--config.eval_at_start=False",
       "--config.data.eval=", "--config.checkpoint.every=-1",
       "--config.metrics.progress_bar=False", "--config.metrics.tensorboard=False",
       f"--config.data.cache_dir={tmp_path / 'cache'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "data[train/preference]: 8 rows read, 8 examples kept" in proc.stderr
  assert "step 2: loss" in proc.stdout


def test_main_job_reads_the_shipped_onpolicy_pairs(tok):
  """configs/dpo.py's data (builtin:arithmetic, task_kind onpolicy) through the preference loader:
  every shipped pair, at most data.max_length tokens, eval from the held-out file."""
  c = jaxpost.configs.get("dpo")
  c.data.cache = False
  c.data.prefix_sharing = False  # the two-row layout (tests/test_prefix_sharing.py: the shared)
  for split in ("train", "eval"):
    loader = build_loader(c.data, tok, "preference", 8, split=split, process_index=0,
                          process_count=1)
    assert loader.summary["examples"] == len(task_rows("arithmetic", split, "onpolicy"))
    batch = next(loader)
    assert batch["chosen_input_ids"].shape == (8, c.data.max_length)
    assert batch["chosen_loss_mask"].sum() > 0 and batch["rejected_loss_mask"].sum() > 0
    loader.close()
