"""`data.train = "synthetic[:rows=N,min_length=M]"`: random-token SFT batches, no tokenizer.

Row i (of `rows` distinct rows, cycled; unbounded when rows=0) is drawn from
`default_rng([seed, i])`: a length in [min_length, max_length], uniform token ids, and a prompt
of 1..length/2 tokens that is masked out of the loss. Batches follow the loader contract
(`input_ids`, `attention_mask`, `positions`, `segment_ids`, `loss_mask`, right-padded to
`max_length`), process p of P gets rows [p B/P, (p+1) B/P) of each global batch, and
`state()`/`restore()` give the exact position. For throughput runs and tests of the loop.
"""

from __future__ import annotations

import numpy as np


def parse_spec(spec: str) -> dict:
  """"synthetic:rows=4,min_length=8" -> {"rows": 4, "min_length": 8}."""
  _, _, args = spec.partition(":")
  out = {}
  for item in filter(None, args.split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in ("rows", "min_length"):
      raise ValueError(f"data source {spec!r}: expected synthetic[:rows=N,min_length=M], "
                       f"got {item!r}")
    out[key] = int(value)
  return out


class SyntheticLoader:

  def __init__(self, vocab_size: int, batch_size: int, max_length: int, seed: int = 0,
               rows: int = 0, min_length: int = 0, process_index: int = 0,
               process_count: int = 1):
    if batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes")
    self.vocab_size, self.batch_size, self.max_length = vocab_size, batch_size, max_length
    self.seed, self.rows = seed, rows
    self.min_length = min_length or max(2, max_length // 2)
    self.local_rows = batch_size // process_count
    self.offset = process_index * self.local_rows
    self.batches = 0

  def _row(self, index: int) -> tuple:
    rng = np.random.default_rng([self.seed, index % self.rows if self.rows else index])
    length = int(rng.integers(self.min_length, self.max_length + 1))
    ids = rng.integers(1, self.vocab_size, length)
    return ids, int(rng.integers(1, length // 2 + 1))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    shape = (self.local_rows, self.max_length)
    batch = {k: np.zeros(shape, np.int32) for k in
             ("input_ids", "attention_mask", "positions", "segment_ids", "loss_mask")}
    first = self.batches * self.batch_size + self.offset
    for r in range(self.local_rows):
      ids, prompt = self._row(first + r)
      n = len(ids)
      batch["input_ids"][r, :n] = ids
      batch["attention_mask"][r, :n] = 1
      batch["positions"][r, :n] = np.arange(n)
      batch["segment_ids"][r, :n] = 1
      batch["loss_mask"][r, prompt:n] = 1
    self.batches += 1
    return batch

  def state(self) -> dict:
    return {"batches": self.batches}

  def restore(self, state: dict):
    self.batches = int(state["batches"])
