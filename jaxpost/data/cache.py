"""On-disk cache of tokenised tables, so a resume or a second run on the same data starts fast.

    path = table_path(cfg, chat_tokenizer, kind, split, names, sources)   # None: cache off
    table = load_table(path)            # None when absent or unreadable (then rebuilt)
    save_table(path, table)

Key. The file name is a SHA-256 over everything the table depends on: the rows as read (their
JSON text and places, so any change to the data, `max_rows` or the source order is a new key), the
source names, the kind and split, the column mapping, the length limits, `train_on`,
`drop_bad_rows`, the tokenizer (its full serialised vocabulary/merges/normaliser for fast
tokenizers, else its vocabulary, plus special tokens), the resolved chat template, the system
prompt, and the source code of the modules that turn rows into records (formats, chat, table), so
a code change never reuses an old table.

Where. `data.cache_dir`, or by default `$JAXPOST_CACHE/tokenized` (`~/.cache/jaxpost/tokenized`
when JAXPOST_CACHE is unset): shared by every workdir, so a second recipe on the same data reuses
it; `data.cache=False` turns it off. Files are never evicted (delete the folder to reclaim space).

File. One `.npz` (no pickle): per record field, the concatenated arrays and their lengths (or a
scalar column), plus a JSON `meta` entry (key, summary, per-source sizes, prompt-kind examples).
It is written to a temporary name and renamed, so a reader never sees half a file; a file that
fails to load or does not match its key is ignored with a warning and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

from jaxpost import bundled

log = logging.getLogger(__name__)
VERSION = 1
CODE_MODULES = ("formats.py", "chat.py", "table.py")


def cache_root(cfg: dict) -> Optional[Path]:
  if not cfg.get("cache", True):
    return None
  if cfg.get("cache_dir"):
    return Path(cfg["cache_dir"]).expanduser()
  return bundled.cache_root() / "tokenized"


def tokenizer_digest(tokenizer) -> str:
  """What tokenisation depends on in a HF tokenizer (see the module docstring)."""
  h = hashlib.sha256(type(tokenizer).__name__.encode())
  backend = getattr(tokenizer, "backend_tokenizer", None)
  h.update(backend.to_str().encode() if backend is not None else
           json.dumps(sorted(tokenizer.get_vocab().items())).encode())
  h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
  for attr in ("add_bos_token", "add_eos_token", "padding_side", "truncation_side"):
    h.update(repr(getattr(tokenizer, attr, None)).encode())
  return h.hexdigest()


def _code_digest() -> str:
  here = Path(__file__).parent
  return hashlib.sha256(b"".join((here / m).read_bytes() for m in CODE_MODULES)).hexdigest()


def table_key(cfg: dict, ct, kind: str, split: str, names, sources) -> Optional[str]:
  """The cache key, or None when the rows cannot be serialised deterministically."""
  h = hashlib.sha256()
  settings = {k: cfg.get(k) for k in ("columns", "max_length", "max_prompt_length",
                                      "max_completion_length", "truncation_mode", "train_on",
                                      "drop_bad_rows")}
  try:
    h.update(json.dumps([VERSION, kind, split, list(names), settings, ct.template,
                         ct.system_prompt, ct.pad_id, ct.eos_id], sort_keys=True).encode())
    for rows in sources:
      h.update(b"\x00source")
      for place, row in rows:
        h.update(json.dumps([list(place), row if isinstance(row, dict) else str(row)],
                            sort_keys=True, default=repr).encode())
  except (TypeError, ValueError) as e:  # e.g. non-string keys
    log.info("tokenisation cache off for these rows (%s)", e)
    return None
  h.update(tokenizer_digest(ct.tokenizer).encode())
  h.update(_code_digest().encode())
  return h.hexdigest()


def table_path(cfg: dict, ct, kind: str, split: str, names, sources) -> Optional[Path]:
  root = cache_root(cfg)
  key = table_key(cfg, ct, kind, split, names, sources) if root is not None else None
  return None if key is None else root / f"{kind}-{key[:32]}.npz"


# ---------------------------------------------------------------- file format


def save_table(path: Path, table) -> None:
  """Writes `table` atomically (tmp file + rename); a failure only logs a warning."""
  if not table.records:
    return
  arrays, fields = {}, {}
  for name in table.records[0]:
    values = [r[name] for r in table.records]
    if isinstance(values[0], np.ndarray):
      arrays[f"{name}.data"] = np.concatenate(values)
      arrays[f"{name}.lengths"] = np.asarray([len(v) for v in values], np.int64)
      fields[name] = "array"
    else:
      arrays[name] = np.asarray(values)
      fields[name] = "scalar"
  meta = {"version": VERSION, "key": path.stem, "fields": fields, "summary": table.summary,
          "source_sizes": [len(ids) for ids in table.source_ids], "examples": table.examples}
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
    log.info("tokenised table cached at %s", path)
  except (OSError, TypeError, ValueError) as e:
    if tmp.is_file():
      tmp.unlink()
    log.warning("could not write the tokenisation cache %s (%s); continuing without it", path, e)


def load_table(path: Path):
  """The cached Table at `path`, or None (absent, or unreadable: warned, rebuilt)."""
  from jaxpost.data.table import Table  # pylint: disable=import-outside-toplevel
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(z["meta"].tobytes())
      if meta["version"] != VERSION or meta["key"] != path.stem:
        raise ValueError("key or version mismatch")
      columns = {}
      for name, how in meta["fields"].items():
        if how == "array":
          lengths = z[f"{name}.lengths"]
          columns[name] = np.split(z[f"{name}.data"], np.cumsum(lengths)[:-1])
        else:
          columns[name] = list(z[name])  # numpy scalars of the saved dtype
    n = sum(meta["source_sizes"])
    if any(len(v) != n for v in columns.values()):
      raise ValueError("field lengths differ")
    records = [{name: v[i] for name, v in columns.items()} for i in range(n)]
    ends = np.cumsum(meta["source_sizes"])
    source_ids = [np.arange(e - s, e) for s, e in zip(meta["source_sizes"], ends)]
    return Table(records, source_ids, meta["examples"], meta["summary"])
  except Exception as e:  # pylint: disable=broad-except  # any damage: rebuild
    log.warning("ignoring the unreadable tokenisation cache %s (%s: %s); tokenising again", path,
                type(e).__name__, e)
    return None
