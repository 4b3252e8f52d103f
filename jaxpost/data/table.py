"""The tokenised table: every source's rows normalised, tokenised once, counted in a summary.

    table = build_table(specs, chat_tokenizer, "sft", "train", cfg)
    table.records[i]      # {"ids", "mask", "truncated"} (chat.tokenize_example's records)
    table.summary         # rows read, examples kept, dropped by reason, tokens, truncation rate

Bad rows and unreadable lines (formats.DataError, readers.py) raise, or with `drop_bad_rows` are
dropped and counted by reason; rows emptied by the length limits ("no_trainable_tokens") are
always dropped and counted. When every example is cut by the limits (truncated, or dropped as
too long) the limits are wrong, not the data: that is an error naming data.max_length; a
truncated share above TRUNCATION_WARNING is a warning.

The table is cached on disk (jaxpost/data/cache.py): a rerun on the same rows with the same
tokenizer, template and limits loads it instead of tokenising again.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import numpy as np
import tqdm

from jaxpost.data import cache
from jaxpost.data.chat import ChatTokenizer, Limits, tokenize_example
from jaxpost.data.formats import DataError, normalize_row
from jaxpost.data.heldout import select_part
from jaxpost.data.sources import read_rows, templated

log = logging.getLogger(__name__)
ALWAYS_DROPPED = ("no_trainable_tokens",)  # a consequence of the limits, not bad input
CUT_BY_LIMITS = ("no_trainable_tokens", "prompt_too_long")
TRUNCATION_WARNING = 0.5
PROGRESS_LINES_FROM = 1000  # rows between counted log lines when there is no progress bar


@dataclasses.dataclass
class Table:
  """Tokenised examples of every source, plus the summary counts."""
  records: list = dataclasses.field(default_factory=list)
  source_ids: list = dataclasses.field(default_factory=list)  # per source: example ids
  examples: list = dataclasses.field(default_factory=list)  # normalised (prompt kind only)
  summary: dict = dataclasses.field(default_factory=dict)


def limits(cfg: dict) -> Limits:
  return Limits(cfg["max_length"], cfg["max_prompt_length"], cfg["max_completion_length"],
                cfg["truncation_mode"])


def build_table(specs, ct: ChatTokenizer, kind: str, split: str, cfg: dict,
                part: tuple = (None, 0.0)) -> Table:
  """Reads every source at `split`, then loads the cached table or tokenises (and caches) it;
  `part` = (side, fraction) of a held-out slice (jaxpost/data/heldout.py) keeps that side of
  each source's rows."""
  sources = [templated(spec, select_part(list(read_rows(spec, split, kind, cfg)), *part),
                       cfg.get("templates")) for spec in specs]
  path = cache.table_path(cfg, ct, kind, split, [s.name for s in specs], sources)
  table = cache.load_table(path) if path else None
  if table is None:
    table = tokenize_sources(specs, sources, ct, kind, split, cfg)
    if path:
      cache.save_table(path, table)
  else:
    log.info("data[%s/%s]: tokenised table loaded from %s", split, kind, path)
  check_truncation(table.summary, cfg)
  return table


def tokenize_sources(specs, sources, ct: ChatTokenizer, kind: str, split: str,
                     cfg: dict) -> Table:
  """Normalises and tokenises the rows of each source (a progress bar on a terminal, else a
  log line every tenth of the rows, at least PROGRESS_LINES_FROM apart)."""
  lim, table = limits(cfg), Table()
  dropped, counts, per_source = collections.Counter(), collections.Counter(), {}
  total, started = sum(len(rows) for rows in sources), time.perf_counter()
  log.info("data[%s/%s]: tokenising %d rows", split, kind, total)
  bar = tqdm.tqdm(total=total, desc=f"tokenising {split}", unit="row", disable=None,
                  mininterval=1.0, leave=False)
  every = max(total // 10, PROGRESS_LINES_FROM) if bar.disable else 0  # no terminal: log lines
  done = 0
  for spec, rows in zip(specs, sources):
    start = len(table.records)
    columns = {**(cfg["columns"] or {}), **(spec.columns or {})}
    for place, row in rows:
      bar.update()
      done += 1
      if every and done % every == 0:
        log.info("data[%s/%s]: tokenised %d / %d rows", split, kind, done, total)
      for rec, ex in _row_records(row, place, ct, kind, lim, columns, cfg, dropped):
        _count(rec, counts)
        table.records.append(rec)
        if kind == "prompt":
          table.examples.append(ex)
    table.source_ids.append(np.arange(start, len(table.records)))
    per_source[spec.name] = {"rows_read": len(rows), "examples": len(table.records) - start}
  bar.close()
  kept = len(table.records)
  table.summary = {
      "kind": kind, "split": split, "rows_read": total, "examples": kept,
      "dropped": dict(dropped), "tokens": counts["tokens"],
      "trainable_tokens": counts["trainable"], "truncated": counts["truncated"],
      "truncation_rate": counts["truncated"] / max(kept, 1), "sources": per_source}
  log.info("data[%s/%s]: tokenised %d rows in %.1f s", split, kind, total,
           time.perf_counter() - started)
  return table


def _row_records(row, place, ct, kind, lim, columns, cfg, dropped):
  """[(record, example)] of one row; its bad parts raised or dropped (counted)."""
  if isinstance(row, DataError):  # a line the reader could not parse
    _drop_or_raise(row, cfg, dropped)
    return []
  try:
    examples = normalize_row(row, kind, columns, *place)
  except DataError as e:
    _drop_or_raise(e, cfg, dropped)
    return []
  out = []
  for ex in examples:
    try:
      out.append((tokenize_example(ct, ex, kind, lim, cfg["train_on"]), ex))
    except DataError as e:
      _drop_or_raise(e.at(*place), cfg, dropped)
  return out


def _drop_or_raise(e: DataError, cfg: dict, dropped: collections.Counter):
  if e.reason in ALWAYS_DROPPED or cfg["drop_bad_rows"]:
    dropped[e.reason] += 1
  else:
    raise e


def _count(rec: dict, counts: collections.Counter):
  for key, value in rec.items():
    if key.endswith("ids"):
      counts["tokens"] += len(value)
    elif key.endswith("mask"):
      counts["trainable"] += int(value.sum())
  counts["truncated"] += int(rec["truncated"])


def check_truncation(s: dict, cfg: dict):
  """Error when the limits cut every example, warning when they cut more than half."""
  cut = s["truncated"] + sum(s["dropped"].get(r, 0) for r in CUT_BY_LIMITS)
  seen = s["examples"] + sum(s["dropped"].get(r, 0) for r in CUT_BY_LIMITS)
  if not seen or not cut:
    return
  keys = ", ".join(f"data.{k}={cfg[k]}" for k in ("max_length", "max_prompt_length",
                                                  "max_completion_length") if cfg[k])
  what = f"data[{s['split']}/{s['kind']}]: {cut} of {seen} examples"
  if cut == seen:
    raise ValueError(f"{what} are longer than the limits ({keys}): every one was truncated or "
                     "dropped; raise data.max_length")
  if cut / seen > TRUNCATION_WARNING:
    log.warning("%s (%.0f%%) are truncated or dropped by the limits (%s)", what,
                100 * cut / seen, keys)


def format_summary(s: dict) -> str:
  dropped = ", ".join(f"{k}={v}" for k, v in sorted(s["dropped"].items())) or "none"
  return (f"data[{s['split']}/{s['kind']}]: {s['rows_read']} rows read, {s['examples']} examples "
          f"kept, dropped: {dropped}; {s['tokens']} tokens ({s['trainable_tokens']} trained), "
          f"truncated {s['truncation_rate']:.1%}")
