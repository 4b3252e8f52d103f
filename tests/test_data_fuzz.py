"""Fuzz: a folder of random files with every data case; no valid row is dropped or changed.

Each seed writes a mixed-schema folder: jsonl (valid rows mixing standard and conversational
formats, numeric-looking / JSON-looking strings, blank lines, and bad lines of every kind), the
same gzip-compressed, a JSON array, a file with non-UTF-8 bytes, an empty file, a CSV and a
parquet file with an extra column. Then

* drop_bad_rows=False: each build fails naming exactly the next bad (file, line) in reading
  order; blanking that line (line numbers stay) and building again reaches the next one, until
  the folder builds and holds exactly the valid rows;
* drop_bad_rows=True: one build keeps exactly the valid rows, in order and as written (prompt
  kind keeps the rows themselves; SFT records equal tokenising each row alone), and counts every
  bad line by reason.
"""

import collections
import csv
import gzip
import json

import datasets
import numpy as np
import pytest

from jaxpost.data import DataError, build_loader, data_defaults, normalize_row
from jaxpost.data.chat import ChatTokenizer, Limits, tokenize_example
from jaxpost.hf import load_tokenizer, resolve_model_dir

TRICKY = ["42", "-3", "007", "1e5", "3.0", "true", "false", "null", "None", '{"a": 1}', "[1, 2]",
          "0x1F", "NaN", " 12 ", "é漢🙂", 'quote " and \\ backslash', "two\nlines", "tab\there"]
WORDS = ["alpha", "beta", "gamma", "What is 2+2?", "Answer:"]
BAD_LINES = [  # (raw line, reason): bad in every kind
    (b'{"prompt": "unterminated', "bad_json"),
    (b'{"prompt": "x", "completion": }', "bad_json"),
    (b'["a", "list"]', "bad_row"),
    (b'"a string"', "bad_row"),
    (b'17', "bad_row"),
    (b'{"prompt": "caf\xe9", "completion": "x"}', "bad_encoding"),
    (b'{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "2"}]}',
     "bad_content"),
    (b'{"prompt": 5, "completion": "x"}', "bad_type"),
    (b'{"title": "no usable columns"}', "missing_columns"),
    (b'{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "bad_role"),
]


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))


def _text(rng, blank_ok=False):
  pool = TRICKY + WORDS + ([""] if blank_ok else [])
  return " ".join(pool[i] for i in rng.integers(len(pool), size=rng.integers(1, 3)))


def _valid_row(rng) -> dict:
  prompt, completion = _text(rng), _text(rng) + "."  # "." keeps it non-blank
  shape = rng.integers(3)
  if shape == 0:
    return {"prompt": prompt, "completion": completion}
  if shape == 1:
    return {"prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": completion}]}
  return {"messages": [{"role": "user", "content": prompt},
                       {"role": "assistant", "content": completion}]}


def _jsonl_lines(rng, n_valid):
  """([(raw line, row or None, reason or None)]): valid rows, blank lines, bad lines, shuffled."""
  lines = [(json.dumps(r, ensure_ascii=bool(rng.integers(2))).encode(), r, None)
           for r in (_valid_row(rng) for _ in range(n_valid))]
  lines += [(b"", None, None), (b"   ", None, None)]
  lines += [(raw, None, reason) for raw, reason in
            (BAD_LINES[i] for i in rng.choice(len(BAD_LINES), 4, replace=False))]
  return [lines[i] for i in rng.permutation(len(lines))]


def _write_jsonl(root, name, lines):
  data = b"\n".join(raw for raw, _, _ in lines) + b"\n"
  (root / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
  return [(name, i, row, reason) for i, (_, row, reason) in enumerate(lines, start=1)
          if row is not None or reason is not None]


def write_folder(root, seed):
  """Writes the files; returns [(file, line, row or None, reason or None)] in reading order
  (files by name: a, b, c, d, e, f, g)."""
  rng = np.random.default_rng(seed)
  root.mkdir()
  expected = _write_jsonl(root, "a.jsonl", _jsonl_lines(rng, 8))
  expected += _write_jsonl(root, "b.jsonl.gz", _jsonl_lines(rng, 8))
  array = [_valid_row(rng) for _ in range(5)]
  (root / "c.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in array) + "\n]\n")
  expected += [("c.json", i, r, None) for i, r in enumerate(array, start=2)]
  non_utf8 = (BAD_LINES[5][0], None, "bad_encoding")
  expected += _write_jsonl(root, "d.jsonl", _jsonl_lines(rng, 8) + [non_utf8])
  (root / "e.jsonl").write_bytes(b"")
  expected.append(("e.jsonl", None, None, "empty_file"))
  standard = [{"prompt": _text(rng), "completion": _text(rng) + "."} for _ in range(5)]
  with open(root / "f.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, ["prompt", "completion"])
    writer.writeheader()
    writer.writerows(standard)
  expected += [("f.csv", None, r, None) for r in standard]
  typed = [{"prompt": _text(rng), "completion": _text(rng) + ".", "meta": int(i)}
           for i in range(4)]
  datasets.Dataset.from_list(typed).to_parquet(str(root / "g.parquet"))
  expected += [("g.parquet", i, r, None) for i, r in enumerate(typed)]
  return expected


def _build(tok, folder, kind, tmp_path, **kw):
  c = data_defaults()
  c.train, c.max_length, c.buckets, c.shuffle = str(folder), 512, [512], False
  c.cache_dir = str(tmp_path / "cache")
  c.update(kw)
  return build_loader(c, tok, kind, 2, process_index=0, process_count=1, seed=0)


def _prompt_example(row):
  if "messages" in row:
    return {**row, "prompt": row["messages"][:-1]}
  return row


def _blank_line(path, number):
  raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
  lines = raw.split(b"\n")
  lines[number - 1] = b""
  data = b"\n".join(lines)
  path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_strict_mode_names_each_bad_line_in_turn(tok, tmp_path, seed):
  folder = tmp_path / "data"
  expected = write_folder(folder, seed)
  bad = [(f, n, reason) for f, n, row, reason in expected if reason]
  for file, line, reason in bad:
    with pytest.raises(DataError) as info:
      _build(tok, folder, "sft", tmp_path, cache=False)
    e = info.value
    assert (e.source, e.index, e.reason) == (str(folder / file), line, reason), str(e)
    assert str(e).startswith(f"{folder / file}" + (f" line {line}" if line else ""))
    if line is None:
      (folder / file).unlink()
    else:
      _blank_line(folder / file, line)
  loader = _build(tok, folder, "prompt", tmp_path)
  assert loader.table.examples == [_prompt_example(r) for _, _, r, _ in expected if r]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drop_mode_keeps_every_valid_row_unchanged(tok, tmp_path, seed):
  folder = tmp_path / "data"
  expected = write_folder(folder, seed)
  valid = [r for _, _, r, _ in expected if r]
  reasons = collections.Counter(reason for *_, reason in expected if reason)
  for _ in range(2):  # cold, then from the tokenisation cache
    prompts = _build(tok, folder, "prompt", tmp_path, drop_bad_rows=True)
    assert prompts.table.examples == [_prompt_example(r) for r in valid]
    assert prompts.summary["dropped"] == dict(reasons)
    assert prompts.summary["rows_read"] == len(valid) + sum(reasons.values())
    sft = _build(tok, folder, "sft", tmp_path, drop_bad_rows=True)
    assert sft.summary["examples"] == len(valid) and sft.summary["dropped"] == dict(reasons)
    ct, lim = ChatTokenizer(tok), Limits(512)
    for rec, row in zip(sft.table.records, valid, strict=True):
      (example,) = normalize_row(row, "sft")
      alone = tokenize_example(ct, example, "sft", lim)
      np.testing.assert_array_equal(rec["ids"], alone["ids"])
      np.testing.assert_array_equal(rec["mask"], alone["mask"])
