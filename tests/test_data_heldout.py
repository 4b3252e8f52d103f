"""data.eval = "auto" and report.task = "auto" follow the training data (issue 13 item 16):
custom data is never evaluated on, or reported as, the built-in task."""

import json

import pytest

from jaxpost import configs
from jaxpost.data import heldout
from jaxpost.data.formats import DataError
from jaxpost.data.loader import build_loader
from jaxpost.hf import load_tokenizer, resolve_model_dir

ROWS = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(20)]


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))


def _config(recipe="sft", **data):
  config = configs.get(recipe)
  for key, value in data.items():
    with config.data.ignore_type():
      setattr(config.data, key, value)
  return config


def test_builtin_training_task_evaluates_and_reports_on_that_task():
  for recipe in ("sft", "dpo", "rm"):
    config = configs.get(recipe)
    sources, split, fraction, description = heldout.eval_plan(config.data)
    assert sources is config.data.train and split == "eval" and fraction == 0.0
    assert "eval split of builtin:arithmetic" in description
    assert heldout.report_task(config) == "arithmetic"


def test_custom_training_data_has_no_builtin_eval_or_report(tmp_path):
  config = _config(train=str(tmp_path / "mine.jsonl"))
  sources, _, _, description = heldout.eval_plan(config.data)
  assert sources is None
  assert description.startswith("no eval data: data.train is not a built-in task")
  assert "data.eval_fraction" in description  # says how to get one
  assert heldout.report_task(config) == ""


def test_explicit_eval_and_report_are_kept(tmp_path):
  config = _config(train=str(tmp_path / "mine.jsonl"), eval="builtin:arithmetic")
  config.report.task = "arithmetic"
  assert heldout.eval_plan(config.data)[0] == "builtin:arithmetic"
  assert heldout.report_task(config) == "arithmetic"
  config.data.eval, config.report.task = "", ""
  assert heldout.eval_plan(config.data)[0] is None and heldout.report_task(config) == ""


def test_eval_fraction_holds_out_disjoint_rows_that_are_not_trained_on(tmp_path, tokenizer):
  path = tmp_path / "mine.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  config = _config(train=str(path), eval_fraction=0.2)
  assert "held-out 0.2 of data.train" in heldout.eval_plan(config.data)[3]
  loaders = {split: build_loader(config.data, tokenizer, "sft", 4, split=split)
             for split in ("train", "eval")}
  texts = {split: {tokenizer.decode(r["ids"]) for r in loader.table.records}
           for split, loader in loaders.items()}
  assert len(texts["eval"]) == 4 and len(texts["train"]) == 16
  assert not texts["eval"] & texts["train"]
  everything = {tokenizer.decode(r["ids"]) for r in build_loader(
      _config(train=str(path)).data, tokenizer, "sft", 4).table.records}
  assert texts["eval"] | texts["train"] == everything
  assert "held-out" in loaders["eval"].summary["split"]


def test_a_bad_held_out_row_is_named_by_its_file_row(tmp_path, tokenizer):
  rows = [dict(r) for r in ROWS]
  held = [int(i) for i in heldout.held_out_positions(len(rows), 0.2)]
  rows[held[-1]] = {"prompt": "no completion here"}
  config = _config(train=rows, eval_fraction=0.2)
  with pytest.raises(DataError, match=f"row {held[-1]}\\b"):
    build_loader(config.data, tokenizer, "sft", 4, split="eval")
