"""Reading a data source into rows exactly as written, each with the place it came from.

    for place, row in read_source("data/train.jsonl.gz", split="train"):
      ...  # place = Place("data/train.jsonl.gz", 3, "line"); row a dict, or a DataError

Local json / jsonl / csv files (optionally .gz / .bz2 / .xz compressed) are read here, line by
line, with the standard library: a value reaches the row normaliser as the file wrote it (the
string "42" stays a string, a column may mix strings and message lists), because no table schema
is inferred. A line that cannot be read (invalid JSON, not an object, not UTF-8) is yielded as a
DataError at its file and line, so the loader can raise it or drop and count it; an empty file
is one such error. Damage after which the rest of a file cannot be read (a broken JSON array, a
truncated compressed file, a non-UTF-8 line in a CSV, whose records may span lines) raises at
its line even with drop_bad_rows. CSV values are strings. A `.json` file is one JSON array of
objects, one object, or JSON lines.

Parquet and arrow files, `save_to_disk` folders, hub datasets and `datasets.Dataset` objects
carry their own schema and go through `datasets`; a `Json` feature there (datasets' encoding of
a column of mixed types, which turns "42" into 42 when read back) gets a warning naming the
column, since what was written can no longer be told apart.

A folder is read file by file (so its files may have different columns); files whose path names
a split ("train", "test"/"eval", "validation"/"valid"/"dev") belong to that split, and when no
file names one every file belongs to every split. A string that looks like a path (starts with
/ . ~, has a data-file suffix or more than one "/") and does not exist is "no such file"; other
strings are hub dataset ids.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import logging
import lzma
import re
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

from jaxpost.data.formats import DataError

log = logging.getLogger(__name__)
OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
TEXT_FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}
DATASETS_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
SPLIT_WORDS = {"train": ("train", "training"), "test": ("test", "testing", "eval", "evaluation"),
               "validation": ("validation", "valid", "val", "dev")}


class Place(NamedTuple):
  """Where a row came from: `source unit index` ("a.jsonl line 3", "rows row 0")."""
  source: str
  index: Optional[int]
  unit: str = "row"


def file_format(path: Path) -> tuple[Optional[str], Optional[str]]:
  """(format, compression suffix) from a file name: "a.jsonl.gz" -> ("jsonl", ".gz")."""
  suffixes = [s.lower() for s in path.suffixes]
  compression = suffixes.pop() if suffixes and suffixes[-1] in OPENERS else None
  fmt = suffixes[-1] if suffixes else ""
  if fmt in TEXT_FORMATS:
    return TEXT_FORMATS[fmt], compression
  if fmt in DATASETS_FORMATS and compression is None:
    return DATASETS_FORMATS[fmt], None
  return None, compression


def known_suffixes() -> list[str]:
  text = [s + c for s in TEXT_FORMATS for c in ("",) + tuple(OPENERS)]
  return sorted(text + list(DATASETS_FORMATS))


def looks_like_path(src: str) -> bool:
  """A string meant as a local path: never sent to the hub (see the module docstring)."""
  return (src.startswith(("/", ".", "~")) or src.count("/") > 1 or "\\" in src
          or file_format(Path(src))[0] is not None)


# ---------------------------------------------------------------- local text files


def _lines(path: Path, compression: Optional[str]) -> Iterator[tuple[int, bytes]]:
  """(line number, raw bytes) of a plain or compressed file; damage raises at its line."""
  number = 0
  try:
    with OPENERS.get(compression, open)(path, "rb") as f:
      for number, line in enumerate(f, start=1):
        yield number, line
  except (OSError, EOFError, lzma.LZMAError) as e:  # truncated / not really compressed
    raise DataError("unreadable_file", f"cannot be read ({compression or 'plain'} file): "
                    f"{e}").at(str(path), number + 1, "line") from e


def _decode(raw: bytes, number: int, path: Path):
  """The text of one line, or a DataError naming the first bad byte."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return DataError("bad_encoding", f"is not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                     f"{e.start + 1})").at(str(path), number, "line")
  return text.lstrip("\ufeff") if number == 1 else text


def _object(value, place: Place):
  if isinstance(value, dict):
    return value
  return DataError("bad_row", f"is a JSON {type(value).__name__}, expected an object "
                   "({\"column\": value, ...})").at(*place)


def read_jsonl(path: Path, compression: Optional[str] = None) -> Iterator[tuple[Place, Any]]:
  """One JSON object per non-blank line."""
  for number, raw in _lines(path, compression):
    place = Place(str(path), number, "line")
    text = _decode(raw, number, path)
    if isinstance(text, DataError):
      yield place, text
      continue
    if not text.strip():
      continue
    try:
      value = json.loads(text)
    except json.JSONDecodeError as e:
      yield place, DataError("bad_json", f"is not valid JSON ({e.msg} at column {e.colno}): "
                             f"{text.strip()[:60]!r}").at(*place)
      continue
    yield place, _object(value, place)


def read_json(path: Path, compression: Optional[str] = None) -> Iterator[tuple[Place, Any]]:
  """A JSON array of objects (each placed at its first line), one object, or JSON lines."""
  raw = b"".join(line for _, line in _lines(path, compression))
  first = raw.lstrip()[:1]
  if first != b"[":
    yield from read_jsonl(path, compression)
    return
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError("bad_encoding", f"is not valid UTF-8 (byte {raw[e.start]:#04x})").at(
        str(path), raw.count(b"\n", 0, e.start) + 1, "line") from e
  decoder, i = json.JSONDecoder(), text.index("[") + 1
  line_of = lambda k: text.count("\n", 0, k) + 1
  while True:
    i = _skip_space(text, i)
    if text.startswith("]", i):
      return
    try:
      value, end = decoder.raw_decode(text, i)
    except json.JSONDecodeError as e:
      raise DataError("bad_json", f"is not valid JSON ({e.msg} at column {e.colno}); a JSON "
                      "array cannot skip a broken element - fix it or write JSON lines").at(
                          str(path), e.lineno, "line") from e
    place = Place(str(path), line_of(i), "line")
    yield place, _object(value, place)
    i = _skip_space(text, end)
    if text.startswith(",", i):
      i += 1
    elif not text.startswith("]", i):
      raise DataError("bad_json", "is not valid JSON (expected ',' or ']' after an array "
                      "element)").at(str(path), line_of(i), "line")


def _skip_space(text: str, i: int) -> int:
  while i < len(text) and text[i] in " \t\r\n":
    i += 1
  return i


def read_csv(path: Path, compression: Optional[str] = None) -> Iterator[tuple[Place, Any]]:
  """Rows of a CSV file with a header line; every value a string as written. A non-UTF-8 line
  raises (a CSV record may span lines, so it cannot be skipped alone)."""
  reader = csv.DictReader(_strict_lines(path, compression))
  try:
    header = reader.fieldnames
    while header is not None:
      start = reader.line_num + 1  # a quoted value may span lines: the record's first line
      row = next(reader, None)
      if row is None:
        return
      place = Place(str(path), start, "line")
      if None in row:
        yield place, DataError("bad_row", f"has {len(header) + len(row[None])} fields, the "
                               f"header {len(header)}").at(*place)
      else:
        yield place, row
  except csv.Error as e:
    raise DataError("unreadable_file", f"cannot be read as CSV: {e}").at(
        str(path), reader.line_num, "line") from e


def _strict_lines(path: Path, compression: Optional[str]) -> Iterator[str]:
  for number, raw in _lines(path, compression):
    text = _decode(raw, number, path)
    if isinstance(text, DataError):
      raise text
    yield text


TEXT_READERS = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv}


# ---------------------------------------------------------------- datasets-backed sources


def dataset_rows(ds, name: str) -> Iterator[tuple[Place, Any]]:
  """Rows of a `datasets.Dataset` (warning on lossy mixed-type `Json` columns)."""
  lossy = [k for k, f in getattr(ds, "features", {}).items() if "Json" in repr(f)]
  if lossy:
    log.warning("data source %s: column(s) %s were stored by `datasets` as mixed-type JSON, "
                "which can turn strings such as '42' into numbers; give the original json/jsonl "
                "file as the source to read it exactly", name, lossy)
  for i, row in enumerate(ds):
    yield Place(name, i, "row"), row


def _datasets_file(path: Path, fmt: str) -> Iterator[tuple[Place, Any]]:
  import datasets  # pylint: disable=import-outside-toplevel
  try:
    ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
  except Exception as e:  # pylint: disable=broad-except  # datasets raises many types
    raise DataError("unreadable_file", f"cannot be read as {fmt}: {e}").at(str(path), None) from e
  yield from dataset_rows(ds, str(path))


def read_file(path: Path) -> Iterator[tuple[Place, Any]]:
  """Rows of one local data file; an empty file is a DataError."""
  fmt, compression = file_format(path)
  if fmt is None:
    raise ValueError(f"data source {str(path)!r}: unknown file type; expected one of "
                     f"{known_suffixes()}")
  rows = TEXT_READERS[fmt](path, compression) if fmt in TEXT_READERS else \
      _datasets_file(path, fmt)
  empty = True
  for place, row in rows:
    empty = False
    yield place, row
  if empty:
    yield Place(str(path), None, "line"), DataError(
        "empty_file", "has no rows (empty file)").at(str(path), None)


def folder_files(folder: Path, split: str) -> list[Path]:
  """The data files of `split` in a folder (see the module docstring)."""
  files = sorted(p for p in folder.rglob("*") if p.is_file() and file_format(p)[0] and not any(
      part.startswith((".", "_")) for part in p.relative_to(folder).parts))
  if not files:
    raise ValueError(f"data source {str(folder)!r}: the folder holds no data file (expected "
                     f"{known_suffixes()})")
  named = {}
  for p in files:
    words = set(re.split(r"[^a-z]+", str(p.relative_to(folder)).lower()))
    for name, aliases in SPLIT_WORDS.items():
      if words & set(aliases):
        named.setdefault(name, []).append(p)
  if not named:
    return files
  wanted = named.get(split, [p for p in files if split.lower() in
                             re.split(r"[^a-z]+", str(p.relative_to(folder)).lower())])
  if not wanted:
    raise ValueError(f"data source {str(folder)!r}: its files name the splits "
                     f"{sorted(named)}, none is {split!r} (set the source's 'split')")
  return wanted


def read_source(src: str, split: str, subset: Optional[str] = None) -> Iterator[tuple[Place, Any]]:
  """(place, row or DataError) of a string source: a local file or folder, or a hub dataset."""
  path = Path(src).expanduser()
  if path.is_file():
    yield from read_file(path)
  elif path.is_dir() and any((path / f).exists() for f in SAVED_MARKERS):
    import datasets  # pylint: disable=import-outside-toplevel
    ds = datasets.load_from_disk(str(path))
    yield from dataset_rows(ds[split] if isinstance(ds, datasets.DatasetDict) else ds, src)
  elif path.is_dir():
    for file in folder_files(path, split):
      yield from read_file(file)
  elif looks_like_path(src):
    raise FileNotFoundError(f"data source {src!r}: no such file or folder (resolved to "
                            f"{path.absolute()})")
  else:
    yield from dataset_rows(_hub_dataset(src, subset, split), src)


def _hub_dataset(src: str, subset: Optional[str], split: str):
  import datasets  # pylint: disable=import-outside-toplevel
  try:
    return datasets.load_dataset(src, subset, split=split)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"data source {src!r} is not a local file or folder (relative to "
                     f"{Path.cwd()}) and could not be loaded as a hub dataset (split "
                     f"{split!r}): {e}") from e
