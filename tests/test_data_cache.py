"""The tokenised-table cache: a warm start gives the same table; any input change is a new key;
damaged files are ignored and rebuilt; writes are atomic."""

import json

import numpy as np
import pytest

from jaxpost.data import build_loader, data_defaults
from jaxpost.hf import load_tokenizer, resolve_model_dir

U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))


@pytest.fixture()
def data(tmp_path):
  rows = [{"messages": [U(f"What is {i} + {i}?"), A(f"{2 * i}")]} for i in range(6)]
  rows += [{"prompt": "Say hi", "completion": " hi"}, {"text": "plain text row"}]
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _build(tok, train, cache_dir, kind="sft", tokenizer=None, **kw):
  c = data_defaults()
  c.train, c.max_length, c.buckets, c.cache_dir = train, 64, [64], str(cache_dir)
  c.update(kw)
  return build_loader(c, tokenizer or tok, kind, 2, process_index=0, process_count=1)


def _files(cache_dir):
  return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def assert_same_table(a, b):
  assert a.summary == b.summary and a.fingerprint == b.fingerprint
  assert [len(x) for x in a.table.source_ids] == [len(x) for x in b.table.source_ids]
  assert a.table.examples == b.table.examples
  for ra, rb in zip(a.table.records, b.table.records, strict=True):
    assert ra.keys() == rb.keys()
    for k in ra:
      np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)
      assert np.asarray(ra[k]).dtype == np.asarray(rb[k]).dtype, k


@pytest.mark.parametrize("kind,rows", [
    ("sft", None),
    ("preference", [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.5},
                    {"prompt": [U("q")], "chosen": [A("x")], "rejected": [A("y")]}]),
    ("unpaired", [{"prompt": "p", "completion": "a", "label": True},
                  {"prompt": "p", "completion": "b", "label": 0}]),
    ("prompt", [{"prompt": "p", "answer": "1"}, {"prompt": [U("q")], "answer": "2"}]),
])
def test_warm_start_loads_the_same_table(tok, tmp_path, data, caplog, kind, rows):
  train = str(data) if rows is None else rows
  cold = _build(tok, train, tmp_path / "c", kind)
  assert len(_files(tmp_path / "c")) == 1
  with caplog.at_level("INFO", logger="jaxpost.data.table"):
    warm = _build(tok, train, tmp_path / "c", kind)
  assert "tokenised table loaded from" in caplog.text
  assert_same_table(cold, warm)
  for a, b in zip([next(cold) for _ in range(3)], [next(warm) for _ in range(3)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  cold.close(), warm.close()


def test_every_input_is_in_the_key(tok, tmp_path, data):
  cache = tmp_path / "c"
  _build(tok, str(data), cache)
  variants = [dict(max_length=48, buckets=[48]), dict(train_on="all"),
              dict(system_prompt="Be brief."), dict(truncation_mode="keep_start"),
              dict(max_prompt_length=20), dict(drop_bad_rows=True),
              dict(chat_template="{% for m in messages %}{{ m['content'] }}<|im_end|>"
                                 "{% endfor %}"),
              dict(columns={"text": "body"})]
  for i, kw in enumerate(variants, start=2):
    _build(tok, str(data), cache, **kw)
    assert len(_files(cache)) == i, kw
  _build(tok, {"source": str(data), "max_rows": 5}, cache)
  assert len(_files(cache)) == len(variants) + 2
  data.write_text(data.read_text().replace("plain text row", "plain text rows"))
  _build(tok, str(data), cache)
  assert len(_files(cache)) == len(variants) + 3
  other = load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))
  other.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
  _build(tok, str(data), cache, tokenizer=other)
  assert len(_files(cache)) == len(variants) + 4
  _build(tok, str(data), cache)  # unchanged inputs (any workdir): the same file
  assert len(_files(cache)) == len(variants) + 4


@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 2], lambda b: b"garbage",
                                    lambda b: b""])
def test_damaged_cache_is_ignored_and_rebuilt(tok, tmp_path, data, caplog, damage):
  cache = tmp_path / "c"
  cold = _build(tok, str(data), cache)
  (path,) = cache.iterdir()
  good = path.read_bytes()
  path.write_bytes(damage(good))
  with caplog.at_level("WARNING", logger="jaxpost.data.cache"):
    rebuilt = _build(tok, str(data), cache)
  assert "ignoring the unreadable tokenisation cache" in caplog.text and str(path) in caplog.text
  assert_same_table(cold, rebuilt)
  assert _files(cache) == [path.name]  # rewritten in place, no temporary left behind
  assert_same_table(cold, _build(tok, str(data), cache))


def test_cache_off_and_unwritable_dir(tok, tmp_path, data, caplog):
  _build(tok, str(data), tmp_path / "off", cache=False)
  assert not (tmp_path / "off").exists()
  blocker = tmp_path / "file"
  blocker.write_text("a file, not a folder")
  with caplog.at_level("WARNING", logger="jaxpost.data.cache"):
    loader = _build(tok, str(data), blocker / "sub")
  assert loader.summary["examples"] == 8 and "could not write the tokenisation cache" in caplog.text


def test_default_location_is_under_jaxpost_cache(tok, tmp_path, data, monkeypatch):
  monkeypatch.setenv("JAXPOST_CACHE", str(tmp_path / "jc"))
  _build(tok, str(data), "")
  assert len(_files(tmp_path / "jc" / "tokenized")) == 1


def test_tokenising_reports_progress_without_a_terminal(tok, tmp_path, data, caplog, monkeypatch):
  from jaxpost.data import table
  monkeypatch.setattr(table, "PROGRESS_LINES_FROM", 4)  # pytest's stderr is not a terminal
  with caplog.at_level("INFO", logger="jaxpost.data.table"):
    _build(tok, str(data), tmp_path / "c")
  assert "tokenising 8 rows" in caplog.text and "tokenised 4 / 8 rows" in caplog.text
  assert "tokenised 8 / 8 rows" in caplog.text
