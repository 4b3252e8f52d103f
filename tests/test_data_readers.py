"""Local files reach the normaliser exactly as written; file-level failures name file and line."""

import bz2
import gzip
import json
import lzma

import datasets
import numpy as np
import pytest

from jaxpost.data import DataError, build_loader, data_defaults
from jaxpost.data.readers import looks_like_path, read_source
from jaxpost.hf import load_tokenizer, resolve_model_dir

U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))


def _loader(tok, train, tmp_path, kind="sft", **kw):
  c = data_defaults()
  c.train, c.max_length, c.buckets, c.cache_dir = train, 128, [128], str(tmp_path / "cache")
  c.update(kw)
  return build_loader(c, tok, kind, 2, process_index=0, process_count=1)


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _rows(src, split="train"):
  return [row for _, row in read_source(src, split)]


def test_numeric_looking_strings_stay_strings(tmp_path):
  rows = [{"prompt": f"{i} + {i} =", "completion": str(2 * i)} for i in range(20)]
  rows += [{"prompt": "a", "completion": "true"}, {"prompt": "b", "completion": '{"a": 1}'},
           {"messages": [U("12"), A("13")]}]
  path = _jsonl(tmp_path / "d.jsonl", rows)
  assert _rows(path) == rows
  datasets.Dataset.from_list(rows[:22]).to_csv(str(tmp_path / "d.csv"), index=False)
  assert _rows(str(tmp_path / "d.csv")) == rows[:22]


def test_mixed_types_blame_the_bad_line_and_keep_the_good(tok, tmp_path):
  rows = [{"messages": [U("12"), A("13")]}, {"messages": [U("1"), A(2)]},
          {"prompt": "What is 2+2?", "completion": "4"},
          {"prompt": [U("hi")], "completion": [A("42")]}]
  path = _jsonl(tmp_path / "mixed.jsonl", rows)
  with pytest.raises(DataError, match=r"mixed.jsonl line 2, column 'messages': message 1 "
                     r"\(assistant\) content is int"):
    _loader(tok, path, tmp_path)
  loader = _loader(tok, path, tmp_path, drop_bad_rows=True)
  assert loader.summary["examples"] == 3 and loader.summary["dropped"] == {"bad_content": 1}
  trained = sorted(tok.decode(r["ids"][r["mask"] == 1]) for r in loader.table.records)
  assert trained == ["13<|im_end|>", "42<|im_end|>", "4<|im_end|>"]


@pytest.mark.parametrize("content,reason,where", [
    (b'{"text": "ok"}\n{"text": "broken"\n', "bad_json", "line 2"),
    (b'{"text": "ok"}\n["not", "an", "object"]\n', "bad_row", "line 2"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "bad_encoding", "line 2"),
    (b'', "empty_file", ""),
])
def test_file_level_failures_name_file_and_line(tok, tmp_path, content, reason, where):
  path = tmp_path / "f.jsonl"
  path.write_bytes(content)
  with pytest.raises(DataError, match=rf"f.jsonl{' ' + where if where else ''}: .*\[{reason}\]"):
    _loader(tok, str(path), tmp_path)
  if reason == "empty_file":  # nothing left to train on, but the reason is counted
    with pytest.raises(ValueError, match="No usable examples"):
      _loader(tok, str(path), tmp_path, drop_bad_rows=True)
    return
  loader = _loader(tok, str(path), tmp_path, drop_bad_rows=True)
  assert loader.summary["dropped"] == {reason: 1} and loader.summary["examples"] == 1


def test_broken_json_array_names_the_line(tmp_path):
  path = tmp_path / "a.json"
  path.write_text('[\n  {"text": "a"},\n  {"text": "b"},\n  {"text": }\n]')
  with pytest.raises(DataError, match=r"a.json line 4: is not valid JSON"):
    _rows(str(path))
  path.write_text('[\n  {"text": "a"},\n  7,\n  {"text": "12"}\n]')
  got = list(read_source(str(path), "train"))
  assert [p.index for p, _ in got] == [2, 3, 4] and got[2][1] == {"text": "12"}
  assert isinstance(got[1][1], DataError) and got[1][1].reason == "bad_row"


def test_mixed_schema_folder_reads_every_file(tok, tmp_path):
  folder = tmp_path / "folder"
  folder.mkdir()
  _jsonl(folder / "a.jsonl", [{"prompt": "p", "completion": "c", "extra": 1}])
  _jsonl(folder / "b.jsonl", [{"messages": [U("q"), A("a")]}])
  datasets.Dataset.from_list([{"text": "plain text"}]).to_parquet(str(folder / "c.parquet"))
  (folder / "README.md").write_text("not data")
  assert _loader(tok, str(folder), tmp_path).summary["examples"] == 3


def test_folder_split_by_file_name(tmp_path):
  _jsonl(tmp_path / "train.jsonl", [{"text": "t"}])
  _jsonl(tmp_path / "test.jsonl", [{"text": "e"}])
  assert _rows(str(tmp_path), "train") == [{"text": "t"}]
  assert _rows(str(tmp_path), "test") == [{"text": "e"}]
  with pytest.raises(ValueError, match=r"splits \['test', 'train'\], none is 'validation'"):
    _rows(str(tmp_path), "validation")


@pytest.mark.parametrize("suffix,opener", [(".jsonl.gz", gzip.open), (".json.gz", gzip.open),
                                           (".jsonl.bz2", bz2.open), (".jsonl.xz", lzma.open),
                                           (".csv.gz", gzip.open)])
def test_compressed_files(tmp_path, suffix, opener):
  rows = [{"prompt": "1", "completion": "2"}, {"prompt": "03", "completion": "x"}]
  path = tmp_path / f"d{suffix}"
  text = ("prompt,completion\n1,2\n03,x\n" if ".csv" in suffix else
          "".join(json.dumps(r) + "\n" for r in rows))
  with opener(path, "wt") as f:
    f.write(text)
  assert _rows(str(path)) == rows
  path.write_bytes(b"not compressed")
  with pytest.raises(DataError, match=rf"d{suffix}( line 1)?: cannot be read"):
    _rows(str(path))


@pytest.mark.parametrize("src", ["data/x.jsonl", "./x", "~/nope/a.parquet", "a/b/c",
                                 "x.json.gz"])
def test_missing_path_says_no_such_file(tmp_path, monkeypatch, src):
  monkeypatch.chdir(tmp_path)
  assert looks_like_path(src)
  with pytest.raises(FileNotFoundError, match="no such file"):
    _rows(src)


def test_hub_ids_are_not_paths():
  assert not looks_like_path("Anthropic/hh-rlhf") and not looks_like_path("imdb")


def test_csv_numbers_are_read_by_the_columns_that_hold_them(tok, tmp_path):
  path = tmp_path / "d.csv"
  path.write_text("prompt,completion,label\nWhat is 1+1?,2,true\nWhat is 1+1?,3,0\n")
  loader = _loader(tok, str(path), tmp_path, kind="unpaired")
  assert [r["label"] for r in loader.table.records] == [1, 0]
  path.write_text("prompt,chosen,rejected,margin\nWhat is 1+1?,2,3,1.5\nQ,007,7,\n")
  loader = _loader(tok, str(path), tmp_path, kind="preference")
  np.testing.assert_array_equal([r["margin"] for r in loader.table.records],
                                np.float32([1.5, np.nan]))


def test_lossy_datasets_columns_are_named_in_a_warning(tmp_path, caplog):
  path = _jsonl(tmp_path / "m.jsonl", [{"messages": [U("12"), A("13")]},
                                       {"messages": [U("1"), A(2)]}])
  ds = datasets.load_dataset("json", data_files=path, split="train")  # datasets' own reading
  ds.save_to_disk(str(tmp_path / "saved"))
  with caplog.at_level("WARNING", logger="jaxpost.data.readers"):
    rows = _rows(str(tmp_path / "saved"))
  assert rows[0]["messages"][0]["content"] == 12  # already lost when datasets read the file
  assert "column(s) ['messages'] were stored by `datasets` as mixed-type JSON" in caplog.text
  assert _rows(path)[0]["messages"][0]["content"] == "12"  # the file itself, read exactly
