"""Row formats normalise to the documented structures; bad rows fail with source/row/column."""

import json
from pathlib import Path

import pytest

from jaxpost.data.formats import DataError, normalize_row, parse_hh

CASES = json.loads((Path(__file__).parent / "fixtures" / "data_formats.json").read_text())
U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fixture_formats(case):
  out = normalize_row(case["row"], case["kind"], case.get("columns"))
  assert out == case["expected"]


@pytest.mark.parametrize("k,pairs", [
    (3, [("r0", "r1"), ("r0", "r2"), ("r1", "r2")]),
    (4, [("r0", "r1"), ("r0", "r2"), ("r0", "r3"), ("r1", "r2"), ("r1", "r3"), ("r2", "r3")]),
])
def test_ranked_pairs_best_first(k, pairs):
  out = normalize_row({"prompt": "p", "responses": [f"r{i}" for i in range(k)]}, "preference")
  assert [(o["chosen"], o["rejected"]) for o in out] == pairs
  assert all(o["margin"] is None and o["prompt"] == "p" for o in out)


def test_ranked_scores_sort_and_skip_ties():
  row = {"prompt": [U("q")], "responses": [[A("a")], [A("b")], [A("c")], [A("d")]],
         "scores": [1, 3, 3, 0]}
  out = normalize_row(row, "preference")
  got = [(o["chosen"][0]["content"], o["rejected"][0]["content"], o["margin"]) for o in out]
  # order by score: b(3), c(3), a(1), d(0); b/c tie -> no pair
  assert got == [("b", "a", 2.0), ("b", "d", 3.0), ("c", "a", 2.0), ("c", "d", 3.0),
                 ("a", "d", 1.0)]


def test_parse_hh():
  assert parse_hh("\n\nHuman: hi there\n\nAssistant: hello") == [U("hi there"), A("hello")]
  assert parse_hh("Human: no leading newlines") is None


def _error(row, kind="sft", **kw) -> DataError:
  with pytest.raises(DataError) as info:
    normalize_row(row, kind, source="train.jsonl", index=7, **kw)
  return info.value


@pytest.mark.parametrize("row,kind,reason,column,words", [
    ({"question": "x", "answer": "y"}, "sft", "missing_columns", None,
     ["found columns ['answer', 'question']", "prompt+completion", "messages"]),
    ({"prompt": "x", "completion": "y"}, "preference", "missing_columns", None,
     ["prompt+chosen+rejected", "chosen+rejected", "prompt+responses"]),
    ({"messages": [{"role": "robot", "content": "x"}]}, "sft", "bad_role", "messages",
     ["message 0", "'robot'"]),
    ({"messages": [U("x"), {"role": "assistant", "content": 5}]}, "sft", "bad_content",
     "messages", ["message 1", "int, expected str"]),
    ({"prompt": "x", "completion": "   "}, "sft", "empty_completion", "completion", ["empty"]),
    ({"prompt": "x", "chosen": "a", "rejected": "a"}, "preference", "identical_pair",
     "rejected", ["identical"]),
    ({"chosen": "abc", "rejected": "xyz"}, "preference", "no_common_prompt", "chosen",
     ["no prompt prefix"]),
    ({"chosen": [A("a")], "rejected": [A("b")]}, "preference", "no_common_prompt", "chosen",
     ["no prompt prefix"]),
    ({"prompt": "x", "chosen": [A("a")], "rejected": [A("b")]}, "preference", "mixed_formats",
     None, ["'prompt': 'string'", "'chosen': 'messages'"]),
    ({"prompt": "x", "completion": "y", "label": "yes"}, "unpaired", "bad_label", "label",
     ["'yes'"]),
    ({"messages": [U("only a question")]}, "sft", "no_assistant", "messages", ["no assistant"]),
    ({"prompt": "p", "responses": ["only one"]}, "preference", "too_few_responses", "responses",
     ["at least 2"]),
    ({"prompt": 3, "completion": "y"}, "sft", "bad_type", "prompt", ["found int"]),
])
def test_bad_rows(row, kind, reason, column, words):
  err = _error(row, kind)
  msg = str(err)
  assert err.reason == reason and err.column == column
  assert msg.startswith("train.jsonl row 7") and (column is None or repr(column) in msg)
  for w in words:
    assert w in msg, (w, msg)


def test_unknown_kind():
  with pytest.raises(ValueError, match="Unknown data kind"):
    normalize_row({"text": "x"}, "pretrain")
