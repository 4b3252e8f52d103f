"""Loader: sources, summary and drops, mixtures, sharding, epochs and exact resume."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from jaxpost.data import DataError, build_loader, data_defaults, format_summary
from jaxpost.hf import load_tokenizer, resolve_model_dir

FIXTURES = Path(__file__).parent / "fixtures"
SFT_JSONL = FIXTURES / "chat_sft.jsonl"
PREF_JSONL = FIXTURES / "preference.jsonl"
U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))


def _cfg(train, **kw):
  c = data_defaults()
  c.train, c.max_length, c.buckets = train, 128, [32, 64, 128]
  c.update(kw)
  return c


def _loader(tok, train, kind="sft", batch_size=4, seed=0, pi=0, pc=1, **kw):
  return build_loader(_cfg(train, **kw), tok, kind, batch_size, seed=seed, process_index=pi,
                      process_count=pc)


def _take(loader, n):
  out = [next(loader) for _ in range(n)]
  loader.close()
  return out


def _prompt_rows(n):
  return [{"prompt": f"Question number {i}?", "answer": str(i)} for i in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_local_files_and_lists_agree(tok, tmp_path):
  rows = [json.loads(line) for line in SFT_JSONL.read_text().splitlines()]
  ds = datasets.Dataset.from_list(rows)
  ds.to_parquet(str(tmp_path / "d.parquet"))
  ds.save_to_disk(str(tmp_path / "saved"))
  (tmp_path / "folder").mkdir()
  (tmp_path / "folder" / "train.jsonl").write_text(SFT_JSONL.read_text())
  arrow = next((tmp_path / "saved").glob("*.arrow"))
  ref = _take(_loader(tok, rows), 2)
  for src in (str(SFT_JSONL), str(tmp_path / "d.parquet"), str(tmp_path / "saved"), str(arrow),
              str(tmp_path / "folder"), {"source": ds}):
    loader = _loader(tok, src)
    assert loader.summary["rows_read"] == 12 and loader.summary["examples"] == 12
    assert_batches_equal(_take(loader, 2), ref)


def test_csv_standard_rows(tok, tmp_path):
  rows = [{"q": f"{i}+{i}=", "a": f" is {2 * i}"} for i in range(4)]
  datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"))
  loader = _loader(tok, str(tmp_path / "d.csv"), columns={"prompt": "q", "completion": "a"})
  b = _take(loader, 1)[0]
  trained = [tok.decode(ids[m == 1]) for ids, m in zip(b["input_ids"], b["loss_mask"])]
  assert sorted(trained) == [f" is {2 * i}<|im_end|>" for i in range(4)]


def test_summary_and_bad_rows(tok):
  rows = [{"messages": [U("hi"), A("hello")]},
          {"messages": [U("hi"), {"role": "robot", "content": "x"}]},
          {"messages": [U("hi"), A("")]},
          {"prompt": "q", "completion": "a"},
          {"messages": [U("word " * 200), A("cut away")]},  # truncated -> nothing to train
          {"title": "misnamed"}]
  spec = {"rows": rows, "name": "mydata"}
  with pytest.raises(DataError, match=r"mydata row 1, column 'messages': message 1 has role"):
    _loader(tok, spec, truncation_mode="keep_start")
  loader = _loader(tok, spec, drop_bad_rows=True, truncation_mode="keep_start")
  s = loader.summary
  assert s["rows_read"] == 6 and s["examples"] == 2
  assert s["dropped"] == {"bad_role": 1, "empty_completion": 1, "no_trainable_tokens": 1,
                          "missing_columns": 1}
  assert s["tokens"] > s["trainable_tokens"] > 0
  assert "6 rows read, 2 examples kept" in format_summary(s)
  for b in _take(loader, 3):  # every row has something to learn
    assert (b["loss_mask"].sum(1) > 0).all() and (b["loss_mask"][:, 0] == 0).all()


def test_truncation_rate(tok):
  rows = [{"prompt": "word " * 100, "completion": "ok"}, {"prompt": "q", "completion": "a"}]
  s = _loader(tok, rows, max_length=32, buckets=[32]).summary
  assert s["truncated"] == 1 and s["truncation_rate"] == 0.5


def test_epochs_seed_and_order(tok):
  rows = _prompt_rows(12)
  a = _take(_loader(tok, rows, "prompt", seed=1), 6)
  ids = [b["row"].tolist() for b in a]
  assert sorted(sum(ids[:3], [])) == list(range(12)) == sorted(sum(ids[3:], []))
  assert sum(ids[:3], []) != sum(ids[3:], [])  # reshuffled per epoch
  assert_batches_equal(a, _take(_loader(tok, rows, "prompt", seed=1), 6))
  assert ids != [b["row"].tolist() for b in _take(_loader(tok, rows, "prompt", seed=2), 6)]
  loader = _loader(tok, rows, "prompt", seed=1)
  b = _take(loader, 1)[0]
  assert loader.example(int(b["row"][0]))["answer"] == str(b["row"][0])
  assert tok.decode(b["prompt_input_ids"][0][b["prompt_attention_mask"][0] == 1]) == \
      f"Question number {b['row'][0]}?"


def test_mixture_weights_and_caps(tok):
  a, b = _prompt_rows(8), [{"prompt": f"B {i}"} for i in range(20)]
  train = [{"rows": a, "weight": 1.0}, {"rows": b, "weight": 3.0, "max_rows": 8, "name": "B"}]
  loader = _loader(tok, train, "prompt")
  assert loader.summary["sources"]["B"] == {"rows_read": 8, "examples": 8}
  seen = np.concatenate([x["row"] for x in _take(loader, 8)])  # 2 epochs of 16 draws
  counts = np.bincount(seen, minlength=16)
  assert (counts[:8] == 1).all()  # A: 4 per epoch, no repeats until exhausted
  assert (counts[8:] == 3).all()  # B: 12 per epoch, upsampled


def test_process_shards_disjoint_and_cover(tok):
  rows = _prompt_rows(24)
  shards = [np.concatenate([b["row"] for b in _take(_loader(tok, rows, "prompt", 8, pi=p, pc=2),
                                                      3)]) for p in (0, 1)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(np.concatenate(shards)) == list(range(24))
  whole = _take(_loader(tok, str(SFT_JSONL), batch_size=4), 2)
  parts = [_take(_loader(tok, str(SFT_JSONL), batch_size=4, pi=p, pc=2), 2) for p in (0, 1)]
  for g, p0, p1 in zip(whole, *parts):
    for k in g:
      np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), g[k])
  with pytest.raises(ValueError, match="not divisible"):
    _loader(tok, rows, "prompt", 5, pc=2)


@pytest.mark.parametrize("kind,src,kw", [
    ("sft", SFT_JSONL, {"packing": True, "max_length": 64, "buckets": [64]}),
    ("sft", SFT_JSONL, {"prefetch": 0}),
    ("preference", PREF_JSONL, {}),
    ("unpaired", PREF_JSONL, {}),
])
def test_resume_gives_the_next_batches(tok, kind, src, kw):
  full = _take(_loader(tok, str(src), kind, batch_size=4, seed=3, **kw), 9)  # crosses epochs
  first = _loader(tok, str(src), kind, batch_size=4, seed=3, **kw)
  _take(first, 4)
  state = json.loads(json.dumps(first.state()))
  resumed = _loader(tok, str(src), kind, batch_size=4, seed=3, **kw)
  resumed.restore(state)
  assert_batches_equal(_take(resumed, 5), full[4:])
  other = _loader(tok, str(src), kind, batch_size=4, seed=4, **kw)
  with pytest.raises(ValueError, match="different data, seed"):
    other.restore(state)


def test_packing_fills_rows(tok):
  loader = _loader(tok, str(SFT_JSONL), batch_size=2, packing=True, max_length=128,
                   buckets=[128])
  batches = _take(loader, 6)
  assert all(b["input_ids"].shape == (2, 128) for b in batches)
  assert max(b["segment_ids"].max() for b in batches) >= 2
  lengths = [len(r["ids"]) for r in loader.table.records]
  packed = sum(int(b["attention_mask"].sum()) for b in batches)
  assert packed / (6 * 2 * 128) > 0.8 and packed > 6 * 2 * np.mean(lengths)


def test_builtin_task_source(tok):
  tasks = pytest.importorskip("jaxpost.data.tasks")
  name = sorted(tasks.TASKS)[0]
  loader = _loader(tok, f"builtin:{name}", "sft", max_length=256, buckets=[256])
  assert loader.summary["examples"] > 0
  assert (_take(loader, 1)[0]["loss_mask"].sum(1) > 0).all()


def test_limits_that_cut_every_row_fail_naming_the_key(tok, caplog):
  rows = [{"prompt": "word " * 40, "completion": f"answer {i}"} for i in range(4)]
  with pytest.raises(ValueError, match=r"4 of 4 examples are longer than the limits "
                     r"\(data.max_length=16\).*raise data.max_length"):
    _loader(tok, rows, max_length=16, buckets=[16])
  long_texts = [{"text": "word " * 40} for _ in range(3)]
  with pytest.raises(ValueError, match=r"3 of 3 examples"):
    _loader(tok, long_texts, max_length=16, buckets=[16])
  with caplog.at_level("WARNING", logger="jaxpost.data.table"):
    loader = _loader(tok, rows + [{"prompt": "q", "completion": "a"}], max_length=16,
                     buckets=[16])
  assert loader.summary["truncated"] == 4
  assert "4 of 5 examples (80%) are truncated or dropped by the limits" in caplog.text


def test_train_on_all_batches_train_every_real_token(tok):
  b = _take(_loader(tok, str(SFT_JSONL), train_on="all", prefetch=0), 1)[0]
  want = b["attention_mask"].copy()
  want[:, 0] = 0
  np.testing.assert_array_equal(b["loss_mask"], want)
