"""The data loader: sources -> tokenised examples -> an endless, resumable stream of batches.

    loader = build_loader(config.data, tokenizer, "sft", batch_size=32, seed=0)
    loader = make_loader(config, tokenizer, vocab_size, "sft", "train", 0, 1)  # what the loop uses
    batch = next(loader)             # this process's rows of the next global batch
    state = loader.state()           # JSON-able; loader.restore(state) resumes at the next batch

At build time every source is read exactly as written (`sources`, `readers`), normalised
(`formats`), tokenised once (`chat`; cached on disk, `table` and `cache`) and kept in memory;
`loader.summary` counts rows read, kept, dropped by reason, tokens and the truncation rate.

Order. Epoch e draws n_s = round(E * r_s) examples from source s: r_s = w_s / sum(w) and E the
total example count (data.mixture="weights"), or r_s = w_s min(N_s, K) / sum_t w_t min(N_t, K)
and E = sum_t min(N_t, K) for sources of N_s examples (data.mixture="examples", K =
data.mixture_cap; jaxpost/data/templates.py `mixture_rates`). Source s cycles through its own
seeded permutations, so an over-weighted source repeats and an under-weighted one is
subsampled without repeats until exhausted. The epoch's draws are then shuffled with seed
(seed, e). Stream position k is therefore a pure function of (seed, weights, data), and the
loader state is only the position (plus the examples packing carried over), the same on every
process.

Sharding. Every process builds the same global batch (so all agree on its bucket T) and keeps
rows [p * B/P, (p + 1) * B/P); shards of one global batch are disjoint and cover it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import queue
import threading
from typing import Mapping, Optional

import numpy as np

from jaxpost.data import batching
from jaxpost.data.chat import ChatTokenizer
from jaxpost.data.config import data_defaults
from jaxpost.data.formats import KINDS
from jaxpost.data.heldout import eval_plan, loader_plan, part_label
from jaxpost.data.sources import parse_sources, plain
from jaxpost.data.synthetic import SyntheticLoader, parse_spec
from jaxpost.data.table import Table, build_table, format_summary
from jaxpost.data.templates import mixture_rates

log = logging.getLogger(__name__)
__all__ = ["Loader", "Stream", "Table", "build_loader", "format_summary", "make_loader"]


# ---------------------------------------------------------------- order


class Stream:
  """Stream position k -> example id (module docstring: epochs, weights, seeded shuffles)."""

  def __init__(self, source_ids: list[np.ndarray], weights: list[float], seed: int,
               shuffle: bool, mixture: str = "weights", cap: int = 0):
    sizes = [len(ids) for ids in source_ids]
    total, wsum = sum(sizes), sum(weights)
    if not total or not wsum:
      raise ValueError("No usable examples (every row was dropped, or all weights are 0)")
    for ids, w, n in zip(source_ids, weights, range(len(sizes))):
      if w > 0 and not len(ids):
        raise ValueError(f"data source #{n} has weight {w} but no usable examples")
    if mixture == "weights":
      rates = [w / wsum for w in weights]
    elif mixture == "examples":
      total = sum(min(n, cap) if cap else n for n in sizes)
      rates = list(mixture_rates(dict(enumerate(sizes)), cap or None,
                                 dict(enumerate(weights))).values())
    else:
      raise ValueError(f"data.mixture={mixture!r}; choose weights | examples")
    self.draws = [int(round(total * r)) for r in rates]
    self.epoch_size = sum(self.draws)
    if not self.epoch_size:
      raise ValueError(f"data source weights {weights} give an empty epoch")
    self.source_ids, self.seed, self.shuffle = source_ids, seed, shuffle
    self._cache = (None, None)

  def _perm(self, n: int, *key) -> np.ndarray:
    if not self.shuffle:
      return np.arange(n)
    return np.random.default_rng((self.seed,) + key).permutation(n)

  def epoch(self, e: int) -> np.ndarray:
    if self._cache[0] != e:
      parts = []
      for s, (ids, n) in enumerate(zip(self.source_ids, self.draws)):
        k = np.arange(e * n, (e + 1) * n)  # this source's draw numbers
        q, r = np.divmod(k, max(len(ids), 1))
        part = np.empty(n, np.int64)
        for x in np.unique(q):  # source epoch x: its own permutation
          sel = q == x
          part[sel] = ids[self._perm(len(ids), 1, s, int(x))[r[sel]]]
        parts.append(part)
      order = np.concatenate(parts)
      self._cache = (e, order[self._perm(len(order), 0, e)])
    return self._cache[1]

  def take(self, k: int, n: int) -> list[int]:
    out = []
    while len(out) < n:
      e, r = divmod(k + len(out), self.epoch_size)
      out += self.epoch(e)[r:r + n - len(out)].tolist()
    return out


# ---------------------------------------------------------------- loader


class Loader:
  """Iterates this process's share of each global batch forever; see the module docstring."""

  def __init__(self, table: Table, stream: Stream, kind: str, batch_size: int, buckets,
               pad_id: int, packing: bool, process_index: int, process_count: int,
               prefetch: int = 2, prefix_sharing: bool = False):
    if batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} is not divisible by process_count="
                       f"{process_count}")
    self.prefix_sharing = prefix_sharing and kind == "preference"
    check_packing(kind, packing, self.prefix_sharing, process_count)
    self.table, self.stream, self.kind = table, stream, kind
    self.batch_size, self.buckets, self.pad_id, self.packing = batch_size, buckets, pad_id, packing
    self.local_rows = slice(process_index * batch_size // process_count,
                            (process_index + 1) * batch_size // process_count)
    self.prefetch = prefetch
    self._state = {"cursor": 0, "deferred": [], "batches": 0}
    self._thread = None

  @property
  def summary(self) -> dict:
    return self.table.summary

  @property
  def batches_per_epoch(self) -> int:
    return self.stream.epoch_size // self.batch_size

  @property
  def epoch(self) -> float:
    """Epochs drawn so far: examples taken from the stream / epoch size."""
    return self._state["cursor"] / self.stream.epoch_size

  def steps_for(self, epochs: float) -> int:
    """Steps that draw `epochs` epochs: ceil(epochs x E / batch_size); with packing a batch
    holds about batch_size x T tokens, so ceil(epochs x tokens / (batch_size x T))."""
    if not self.packing or self.prefix_sharing:
      return max(1, math.ceil(epochs * self.stream.epoch_size / self.batch_size))
    tokens = sum(len(self.table.records[i]["ids"]) for i in self.stream.epoch(0))
    return max(1, math.ceil(epochs * tokens / (self.batch_size * self.buckets[-1])))

  def example(self, i: int) -> dict:
    """The normalised example behind `row` i of a prompt batch (prompt kind)."""
    return self.table.examples[i]

  @functools.cached_property
  def fingerprint_inputs(self) -> dict:
    """What a saved position is only valid for: data, order and batch shape (named, so a
    mismatch on resume can say which differs)."""
    lengths = [sum(len(v) for k, v in r.items() if k.endswith("ids")) for r in self.table.records]
    shared = {"prefix_sharing": True} if self.prefix_sharing else {}  # older runs: absent
    return {"kind": self.kind, "batch_size": self.batch_size, "packing": self.packing, **shared,
            "seed": self.stream.seed, "examples_per_source_per_epoch": self.stream.draws,
            "shuffle": self.stream.shuffle, "buckets": list(self.buckets),
            "example_lengths_sha1": hashlib.sha1(np.asarray(lengths, np.int64).tobytes())
                                    .hexdigest()}

  @functools.cached_property
  def fingerprint(self) -> str:
    key = json.dumps(list(self.fingerprint_inputs.values()))
    return hashlib.sha1(key.encode()).hexdigest()[:16]

  def state(self) -> dict:
    return {**self._state, "deferred": list(self._state["deferred"]),
            "fingerprint": self.fingerprint}

  def restore(self, state: Mapping) -> None:
    if state.get("fingerprint") != self.fingerprint:
      raise ValueError("loader state was saved for different data, seed, batch size or buckets "
                       f"(fingerprint {state.get('fingerprint')} != {self.fingerprint})")
    self.close()
    self._state = {"cursor": int(state["cursor"]), "deferred": [int(i) for i in state["deferred"]],
                   "batches": int(state["batches"])}

  # ------------------------------------------------------------ batches

  def global_batch(self, state: Mapping) -> tuple[dict, dict]:
    """(global batch, next state): a pure function of the state."""
    cursor, deferred = state["cursor"], list(state["deferred"])
    recs = self.table.records
    if self.prefix_sharing:
      ids = self.stream.take(cursor, self.batch_size)
      cursor += self.batch_size
      batch = batching.shared_preference_batch([recs[i] for i in ids], self.buckets,
                                               self.pad_id, self.packing)
    elif self.packing:
      T = self.buckets[-1]
      ids, total = deferred, sum(len(recs[i]["ids"]) for i in deferred)
      while total < self.batch_size * T:
        (i,) = self.stream.take(cursor, 1)
        ids, total, cursor = ids + [i], total + len(recs[i]["ids"]), cursor + 1
      bins, unplaced = batching.ffd_pack([len(recs[i]["ids"]) for i in ids], T,
                                         self.batch_size, n_first=len(deferred))
      batch = batching.pack_rows([[(recs[ids[j]]["ids"], recs[ids[j]]["mask"]) for j in b]
                                  for b in bins], T, self.pad_id)
      deferred = [ids[j] for j in unplaced]
    else:
      ids = self.stream.take(cursor, self.batch_size)
      cursor += self.batch_size
      chosen = [recs[i] for i in ids]
      if self.kind == "prompt":
        batch = batching.prompt_batch(chosen, ids, self.buckets, self.pad_id)
      else:
        batch = batching.BATCHERS[self.kind](chosen, self.buckets, self.pad_id)
    return batch, {"cursor": cursor, "deferred": deferred, "batches": state["batches"] + 1}

  def _next_local(self, state):
    batch, state = self.global_batch(state)
    return {k: v[self.local_rows] for k, v in batch.items()}, state

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.prefetch <= 0:
      batch, self._state = self._next_local(self._state)
      return batch
    if self._thread is None:
      self._start()
    item = self._queue.get()
    if isinstance(item, BaseException):
      self.close()
      raise item
    batch, self._state = item
    return batch

  def _start(self):
    self._queue, self._stop = queue.Queue(self.prefetch), threading.Event()
    self._thread = threading.Thread(target=self._produce, daemon=True,
                                    args=(dict(self._state), self._queue, self._stop))
    self._thread.start()

  def _produce(self, state, q: queue.Queue, stop: threading.Event):
    try:
      while not stop.is_set():
        item = self._next_local(state)
        state = item[1]
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # pylint: disable=broad-except
      q.put(e)

  def close(self):
    """Stops the prefetch thread (batches it prepared are discarded; the state is kept)."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None


def build_loader(data_cfg, tokenizer, kind: str, batch_size: int, seed: int = 0,
                 split: str = "train", process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> Loader:
  """A Loader over config.data.train (split="train") or config.data.eval (split="eval")."""
  if kind not in KINDS:
    raise ValueError(f"Unknown data kind {kind!r}; choose one of {KINDS}")
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index, process_count = jax.process_index(), jax.process_count()
  cfg = {**data_defaults().to_dict(), **plain(data_cfg)}
  if not cfg["max_length"]:
    raise ValueError("config.data.max_length must be set (batches have static shapes)")
  sources, read_split, part, fraction = loader_plan(cfg, split)
  specs = parse_sources(sources)
  ct = ChatTokenizer(tokenizer, cfg["chat_template"], cfg["system_prompt"])
  table = build_table(specs, ct, kind, read_split, cfg, (part, fraction))
  table.summary["split"] = part_label(split, part, fraction)
  log.info(format_summary(table.summary))
  stream = Stream(table.source_ids, [s.weight for s in specs], seed,
                  bool(cfg["shuffle"]) and split == "train", cfg["mixture"],
                  int(cfg["mixture_cap"] or 0))
  if len(specs) > 1:
    table.summary["epoch_draws"] = {s.name: n for s, n in zip(specs, stream.draws)}
    log.info("data[%s]: an epoch draws %s (data.mixture=%s)", split, table.summary["epoch_draws"],
             cfg["mixture"])
  buckets = batching.resolve_buckets(cfg["buckets"], cfg["max_length"])
  return Loader(table, stream, kind, batch_size, buckets, ct.pad_id, bool(cfg["packing"]),
                process_index, process_count, int(cfg["prefetch"]), bool(cfg["prefix_sharing"]))


def check_packing(kind: str, packing: bool, prefix_sharing: bool, process_count: int = 1):
  """data.packing is for SFT rows, and for prefix-shared pairs on one process (packed pair rows
  do not split into equal per-process shares)."""
  if packing and kind == "preference" and prefix_sharing:
    if process_count > 1:
      raise ValueError("data.packing=True with data.prefix_sharing=True runs on one process "
                       f"only (got {process_count}); set data.packing=False")
  elif packing and kind != "sft":
    raise ValueError(f"data.packing is for SFT batches and prefix-shared preference pairs only "
                     f"(kind={kind!r}, data.prefix_sharing={prefix_sharing})")


def make_loader(config, tokenizer, vocab_size: int, kind: str, split: str, process_index: int,
                process_count: int):
  """The training loop's loader for `split` ("train" | "eval") of a run config: config.data.train
  or the eval data `heldout.eval_plan` picks, as a `SyntheticLoader` for a "synthetic[:...]"
  source (sft batches only; eval draws with seed + 1), else `build_loader`'s Loader."""
  source = config.data.train if split == "train" else eval_plan(config.data)[0]
  if isinstance(source, str) and source.startswith("synthetic"):
    if kind != "sft":
      raise ValueError(f"data source {source!r} only provides 'sft' batches, not {kind!r}")
    return SyntheticLoader(vocab_size, config.batch_size, config.data.max_length,
                           seed=config.seed + (split != "train"), **parse_spec(source),
                           process_index=process_index, process_count=process_count)
  return build_loader(config.data, tokenizer, kind, config.batch_size, seed=config.seed,
                      split=split, process_index=process_index, process_count=process_count)
