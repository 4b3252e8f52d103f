"""Reference log-probs computed once over the dataset and cached in the workdir (DPO,
`config.precompute_ref=True`).

The pairs the run will draw (the first `max_steps x batch_size` positions of the train loader's
stream, each distinct pair once, from the loader's already tokenised table) are scored once by the
frozen reference, in batches built exactly like training batches, and stored under a content key
of the pair (its chosen and rejected token ids and loss masks) in
`workdir/ref_logps/<fingerprint>.npz`; a rerun with the same reference, data and tokenisation
reuses the file. During training the collect phase
looks each row up and adds `ref_chosen_logps` / `ref_rejected_logps` to the batch, which the DPO
loss prefers over a reference forward (jaxpost/algos/preference.py), so steps skip that forward.
Rows missing from the cache (none, unless max_steps was raised or the data changed under the run)
are scored on the fly.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import jax
import numpy as np

from jaxpost.data import batching
from jaxpost.train.metrics import progress

log = logging.getLogger("jaxpost.train")


def _row_key(ids: np.ndarray, mask: np.ndarray, loss_mask: np.ndarray) -> bytes:
  real = mask.astype(bool)
  return ids[real].astype(np.int32).tobytes() + b"|" + loss_mask[real].astype(np.int8).tobytes()


def pair_keys(batch: dict) -> list[str]:
  """One content key per pair of a (host, numpy) pair batch; independent of the padding and of
  the layout (a prefix-shared pair gets the key of its unshared rows)."""
  if "branch_ids" in batch:
    return [_pair_key([_row_key(ids, np.ones_like(ids), loss) for ids, loss in sides])
            for sides in batching.unshared_pairs(batch)]
  return [_pair_key([_row_key(*(np.asarray(batch[side + f][i]) for f in
                                ("input_ids", "attention_mask", "loss_mask")))
                     for side in ("chosen_", "rejected_")])
          for i in range(len(batch["chosen_input_ids"]))]


def _pair_key(row_keys) -> str:
  h = hashlib.sha1()
  for key in row_keys:
    h.update(key)
  return h.hexdigest()


class RefCache:
  """Content key -> (ref_chosen_logps, ref_rejected_logps), plus a scorer for misses."""

  def __init__(self, table: dict, score):
    self.table, self.score = table, score

  @classmethod
  def build(cls, score, loader, workdir: str, identity: str, draws: int,
            show_progress: bool = False):
    """Scores the pairs of `loader`'s first `draws` stream positions with `score(batch) ->
    (ref_chosen, ref_rejected)`, or loads the cache file of an earlier run with the same
    `identity` (reference + settings) and loader fingerprint."""
    scorer = lambda batch: [np.asarray(x) for x in score(batch)]
    fingerprint = hashlib.sha1(f"{identity}|{loader.fingerprint}".encode())
    path = Path(workdir) / "ref_logps" / f"{fingerprint.hexdigest()[:16]}.npz"
    if path.exists():
      saved = np.load(path)
      table = dict(zip(saved["keys"].tolist(), saved["values"].tolist()))
      log.info("Reference log-probs: %d pairs from %s", len(table), path)
      return cls(table, scorer)
    table = _score_pairs(scorer, loader, _drawn_ids(loader, draws), show_progress)
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      np.savez(path, keys=np.asarray(list(table)), values=np.asarray(list(table.values())))
    log.info("Reference log-probs: scored %d pairs once -> %s", len(table), path)
    return cls(table, scorer)

  def add_to(self, batch: dict) -> dict:
    """The batch with `ref_chosen_logps` / `ref_rejected_logps` [B] float32 added."""
    keys = pair_keys(batch)
    if any(k not in self.table for k in keys):
      self.table.update(zip(keys, zip(*self.score(batch))))
    values = np.asarray([self.table[k] for k in keys], np.float32)
    return {**batch, "ref_chosen_logps": values[:, 0], "ref_rejected_logps": values[:, 1]}


def _drawn_ids(loader, draws: int) -> list[int]:
  """The distinct example ids at stream positions [0, draws), in first-drawn order."""
  return list(dict.fromkeys(loader.stream.take(0, draws)))


def _score_pairs(scorer, loader, ids: list[int], show_progress: bool) -> dict:
  """Content key -> (ref_chosen, ref_rejected) for the table records `ids`, a batch at a time."""
  records, size = loader.table.records, loader.batch_size
  starts = range(0, len(ids), size)
  log.info("Reference log-probs: scoring %d distinct pairs in %d batches", len(ids), len(starts))
  table = {}
  for start in progress(starts, len(starts), "reference log-probs", show_progress):
    chunk = [records[i] for i in ids[start:start + size]]
    chunk = chunk + chunk[:1] * (size - len(chunk))  # a static batch size: pad by repeating
    if getattr(loader, "prefix_sharing", False):
      batch = batching.shared_preference_batch(chunk, loader.buckets, loader.pad_id)
    else:
      batch = batching.preference_batch(chunk, loader.buckets, loader.pad_id)
    table.update(zip(pair_keys(batch), zip(*scorer(batch))))
  return table
