"""Static-shape batches from tokenised records: length buckets, padding and packing.

Every batch is a dict of numpy arrays [B, T] with T the smallest configured bucket that fits the
longest sequence, so a jitted step compiles once per bucket:

    input_ids       token ids (pad_id after the sequence)
    attention_mask  1 real token, 0 padding
    positions       0, 1, ... within each example (per segment when packed), 0 on padding
    segment_ids     1..k for the k examples of a row, 0 on padding
    loss_mask       1 where token t is a trained target (predicted from t-1; never at a
                    segment's first token)

Preference batches carry the five fields prefixed `chosen_`/`rejected_` (one T for both) and a
float32 `margin` [B] (NaN = none); unpaired batches add `label` [B]; prompt batches are LEFT-padded
`prompt_input_ids`/`prompt_attention_mask` plus `row` [B], the example index.

Prefix-shared preference batches (`data.prefix_sharing`; DESIGN "Prefix sharing") lay each pair
as ONE group `[prompt | chosen | rejected]` (the prompt once: the two records' common prefix
before their first trained token), with the five fields plus

    branch_ids      0 on the prompt (and padding), 1 on chosen, 2 on rejected tokens

and positions continuing from the prompt's end in both completions; `margin` stays [B]. One group
per row (row b = pair b, so the rows split into microbatches and shards like the pairs), or with
`data.packing` several groups per row (first-fit-decreasing, a group never split; segment ids
keep groups apart), the row count cut to the smallest B / 2^k that holds them, and

    pair_ids        index b of the pair a token belongs to, B on padding (packed only)
 Row length: the smallest of `shared_buckets` that fits the longest group (a group can be
up to 2 x max_length tokens), at least max_length when packed.

Packing (SFT) puts several examples in one row of length T by first-fit-decreasing: items are
placed longest first into the first row with room (carried-over items first, so none waits
forever); attention never crosses segment ids and positions restart per segment.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jaxpost.data.chat import common_prefix

FIELDS = ("input_ids", "attention_mask", "positions", "segment_ids", "loss_mask")


DEFAULT_BUCKETS = 8  # default buckets per max_length: at most 1/8 of it is padding


def default_buckets(max_length: int) -> list[int]:
  """Multiples of step = ceil(max_length / DEFAULT_BUCKETS) rounded up to a multiple of 8, up to
  max_length: at most DEFAULT_BUCKETS compiled shapes, and a batch pads its longest row by less
  than one step (TRL pads to the longest row; with coarser buckets short rows paid up to 2x)."""
  step = -(-max(-(-max_length // DEFAULT_BUCKETS), 1) // 8) * 8
  return list(range(step, max_length, step)) + [max_length]


def resolve_buckets(buckets: Optional[Sequence[int]], max_length: int) -> tuple[int, ...]:
  """Sorted buckets up to the first one >= max_length (max_length added if none is); None:
  `default_buckets`."""
  if not buckets:
    buckets = default_buckets(max_length)
  out = sorted({int(b) for b in buckets if int(b) > 0})
  if not out or out[-1] < max_length:
    out.append(max_length)
  return tuple(b for b in out if b < max_length) + (next(b for b in out if b >= max_length),)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if b >= length:
      return b
  raise ValueError(f"sequence of {length} tokens exceeds the largest bucket {buckets[-1]}")


def _empty(rows: int, T: int, pad_id: int) -> dict:
  out = {k: np.zeros((rows, T), np.int32) for k in FIELDS}
  out["input_ids"][:] = pad_id
  return out


def pad_rows(seqs: Sequence[tuple[np.ndarray, np.ndarray]], T: int, pad_id: int) -> dict:
  """One example per row, right-padded to T."""
  return pack_rows([[s] for s in seqs], T, pad_id)


def pack_rows(bins: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], T: int,
              pad_id: int) -> dict:
  """Rows holding the (ids, mask) segments of each bin one after another."""
  out = _empty(len(bins), T, pad_id)
  for r, segments in enumerate(bins):
    start = 0
    for k, (ids, mask) in enumerate(segments, start=1):
      n = len(ids)
      if start + n > T:
        raise ValueError(f"row {r}: segments of {start + n} tokens exceed T={T}")
      sl = (r, slice(start, start + n))
      out["input_ids"][sl] = ids
      out["attention_mask"][sl] = 1
      out["positions"][sl] = np.arange(n)
      out["segment_ids"][sl] = k
      out["loss_mask"][sl] = mask
      out["loss_mask"][r, start] = 0
      start += n
  return out


def ffd_pack(lengths: Sequence[int], capacity: int, n_bins: int, n_first: int = 0):
  """First-fit-decreasing: (bins of item indices, unplaced indices in input order).

  Items [0, n_first) are placed first in their order, the rest by decreasing length (stable)."""
  order = list(range(n_first)) + sorted(range(n_first, len(lengths)), key=lambda i: -lengths[i])
  bins, room, placed = [[] for _ in range(n_bins)], [capacity] * n_bins, set()
  for i in order:
    for b in range(n_bins):
      if lengths[i] <= room[b]:
        bins[b].append(i)
        room[b] -= lengths[i]
        placed.add(i)
        break
  return bins, [i for i in range(len(lengths)) if i not in placed]


def shared_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
  """Row lengths of prefix-shared batches: the buckets and their doubles (a group holds a prompt
  and two completions: at most 2 x max_length tokens)."""
  return tuple(sorted(set(buckets) | {2 * b for b in buckets}))


def shared_group(record: dict) -> dict:
  """One pair as a `[prompt | chosen | rejected]` group: numpy arrays ids, mask, branch,
  positions. The prompt is the records' common prefix before either's first trained token."""
  c_ids, r_ids = record["chosen_ids"], record["rejected_ids"]
  c_mask, r_mask = record["chosen_mask"], record["rejected_mask"]
  p = min(common_prefix(c_ids.tolist(), r_ids.tolist()), int(np.argmax(c_mask > 0)),
          int(np.argmax(r_mask > 0)))
  lc, lr = len(c_ids) - p, len(r_ids) - p
  return {"ids": np.concatenate([c_ids, r_ids[p:]]),
          "mask": np.concatenate([c_mask, r_mask[p:]]),
          "branch": np.repeat(np.asarray([0, 1, 2], np.int32), [p, lc, lr]),
          "positions": np.concatenate([np.arange(p + lc), p + np.arange(lr)])}


def shared_preference_batch(records: Sequence[dict], buckets: Sequence[int], pad_id: int,
                            packing: bool = False) -> dict:
  """A prefix-shared pair batch (module docstring) of the B `records`."""
  groups = [shared_group(r) for r in records]
  lengths = [len(g["ids"]) for g in groups]
  T = bucket_for(max(lengths), shared_buckets(buckets))
  b = len(records)
  bins = [[i] for i in range(b)]
  if packing:
    T = max(T, buckets[-1])
    bins = [x for x in ffd_pack(lengths, T, b)[0] if x]
    rows = b
    while rows % 2 == 0 and rows // 2 >= len(bins):
      rows //= 2
    bins += [[] for _ in range(rows - len(bins))]
  out = pack_rows([[(groups[i]["ids"], groups[i]["mask"]) for i in x] for x in bins], T, pad_id)
  out["branch_ids"] = np.zeros_like(out["input_ids"])
  pair_ids = np.full_like(out["input_ids"], b)
  for r, x in enumerate(bins):
    start = 0
    for i in x:
      sl = (r, slice(start, start + lengths[i]))
      out["branch_ids"][sl], out["positions"][sl] = groups[i]["branch"], groups[i]["positions"]
      pair_ids[sl] = i
      start += lengths[i]
  if packing:
    out["pair_ids"] = pair_ids
  out["margin"] = np.asarray([r["margin"] for r in records], np.float32)
  return out


def unshared_pairs(batch: dict) -> list[tuple[tuple[np.ndarray, np.ndarray], ...]]:
  """The pairs of a (host, numpy) prefix-shared batch as they are unshared: for each pair b,
  ((chosen ids, chosen loss mask), (rejected ids, rejected loss mask)) of prompt + completion."""
  branch, real = np.asarray(batch["branch_ids"]), np.asarray(batch["attention_mask"]) > 0
  ids, loss_mask = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"])
  rows = np.arange(len(ids))[:, None]
  pair_ids = np.asarray(batch["pair_ids"]) if "pair_ids" in batch else np.where(real, rows, -1)
  out = []
  for b in range(len(batch["margin"])):
    mine = pair_ids == b
    sides = []
    for side in (1, 2):
      take = mine & ((branch == 0) | (branch == side))
      sides.append((ids[take], loss_mask[take]))
    out.append(tuple(sides))
  return out


def sft_batch(records: Sequence[dict], buckets: Sequence[int], pad_id: int) -> dict:
  T = bucket_for(max(len(r["ids"]) for r in records), buckets)
  return pad_rows([(r["ids"], r["mask"]) for r in records], T, pad_id)


def unpaired_batch(records: Sequence[dict], buckets: Sequence[int], pad_id: int) -> dict:
  out = sft_batch(records, buckets, pad_id)
  out["label"] = np.asarray([r["label"] for r in records], np.int32)
  return out


def preference_batch(records: Sequence[dict], buckets: Sequence[int], pad_id: int) -> dict:
  longest = max(max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in records)
  T = bucket_for(longest, buckets)
  out = {}
  for side in ("chosen", "rejected"):
    rows = pad_rows([(r[f"{side}_ids"], r[f"{side}_mask"]) for r in records], T, pad_id)
    out.update({f"{side}_{k}": v for k, v in rows.items()})
  out["margin"] = np.asarray([r["margin"] for r in records], np.float32)
  return out


def prompt_batch(records: Sequence[dict], rows: Sequence[int], buckets: Sequence[int],
                 pad_id: int) -> dict:
  T = bucket_for(max(len(r["prompt_ids"]) for r in records), buckets)
  ids = np.full((len(records), T), pad_id, np.int32)
  mask = np.zeros((len(records), T), np.int32)
  for i, r in enumerate(records):
    n = len(r["prompt_ids"])
    ids[i, T - n:], mask[i, T - n:] = r["prompt_ids"], 1
  return {"prompt_input_ids": ids, "prompt_attention_mask": mask,
          "row": np.asarray(rows, np.int32)}


BATCHERS = {"sft": sft_batch, "unpaired": unpaired_batch, "preference": preference_batch}
