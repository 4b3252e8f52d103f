"""Prefix sharing for rollout groups: the G completions of one prompt in ONE row, groups packed.

A rollout (algos/rollout.py) lays its R = B * G rows out as [prompt | completion] [R, L], so
every forward over them (the update, the π_old recompute, the reference pass) computes each
prompt G times. With prefix sharing (DESIGN "Prefix sharing"; Wang et al. 2024, applied to
groups as in the DPO pairs) group i is laid out once as

    [prompt_i | y_i1 | y_i2 | ... | y_iG]            branch_ids 0 | 1 | 2 | ... | G

and k = `groups_per_row` groups are packed one after another into a shared row of W slots, each
group its own segment (segment ids 1..k, so no group sees another), the padding only at the end:

    [prompt_a | y_a1 .. y_aG | prompt_b | y_b1 .. y_bG | pad]      segment_ids 1..1 | 2..2 | 0

Completion j sees its own group's prompt and itself only (models/llama.py's segment and branch
rules) and its positions continue from the prompt's end, so each token's log-prob is the one its
unshared row gives; `losses/logprobs.predecessor_index` reads the first token of y_ij from the
last prompt slot of its group.

Widths. `full_width` = k (P + G N) (P: the rollout's prompt width, N = max_new_tokens) holds any
rollout: the π_old recompute inside sampling (μ > 1) uses it. The update runs once the
lengths are sampled, so `row_layout` places the groups on the rows by their real sizes (longest
first, each on the least-filled row with room) and narrows W to the fullest row, rounded up to
max(WIDTH_STEP, full / MAX_WIDTHS) slots: at most MAX_WIDTHS widths, each compiled once. k is
static (`groups_per_row`): the most groups of one microbatch on one device whose full width
stays within MAX_ROW_SLOTS, since chunked attention reads every earlier key of its row.

`slots` [B / k, k G, L] maps position t of the (k G) rollout rows of shared row r to its slot
(W, out of range, on the row's padding): `share` scatters per-row values into the shared rows,
`unshare` gathers per-slot results back to [R, L], so the losses keep reading [R, L] arrays. An
update batch (`grouped_batch`) keeps one leading entry per SHARED ROW ([B / k, k G, ...]
per-row fields next to the `shared_*` rows), so minibatches, gradient accumulation and the mesh
split whole rows; `in_row_order` first puts the rollout's groups in `row_layout`'s order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.losses.logprobs import model_token_stats

SHARED = "shared_"  # prefix of the shared-row fields in an update batch
WIDTH_STEP = 64     # the finest rounding of a narrowed shared row, in slots
MAX_WIDTHS = 16     # at most this many narrowed widths (compilations) per run
MAX_ROW_SLOTS = 2048  # groups are packed into one row while its full width fits this


def full_width(prompt_width: int, num_generations: int, max_new_tokens: int,
               groups_per_row: int = 1) -> int:
  """W that holds k groups of any sampled lengths: k (P + G N)."""
  return groups_per_row * (prompt_width + num_generations * max_new_tokens)


def groups_per_row(groups_per_microbatch: int, group_width: int) -> int:
  """k: the largest divisor of the groups one microbatch puts on one device whose k groups of
  `group_width` (P + G N) slots fit MAX_ROW_SLOTS (at least 1)."""
  fitting = [k for k in range(1, groups_per_microbatch + 1)
             if groups_per_microbatch % k == 0 and k * group_width <= MAX_ROW_SLOTS]
  return max(fitting, default=1)


def row_layout(prompt_lengths, completion_lengths, num_generations: int, groups_per_row: int,
               max_width: int) -> tuple[np.ndarray, int, float]:
  """(order [B], W, fill) of the update's shared rows from host lengths: prompt_lengths [B] and
  completion_lengths [R] (real tokens). Row r holds groups order[r k : (r + 1) k]; the groups
  are placed longest first, each on the least-filled row with room (balanced rows); W is the
  fullest row's tokens rounded up as the module docstring says; fill = real tokens / (rows W)."""
  group = (np.asarray(prompt_lengths, np.int64)
           + np.asarray(completion_lengths, np.int64).reshape(-1, num_generations).sum(-1))
  rows = len(group) // groups_per_row
  members, filled = [[] for _ in range(rows)], np.zeros(rows, np.int64)
  for i in np.argsort(-group, kind="stable"):
    r = min((r for r in range(rows) if len(members[r]) < groups_per_row), key=filled.__getitem__)
    members[r].append(int(i))
    filled[r] += group[i]
  order = np.array([i for row in members for i in sorted(row)], np.int32)
  step = max(WIDTH_STEP, -(-max_width // MAX_WIDTHS))
  width = int(min(max_width, step * -(-int(filled.max()) // step)))
  return order, width, float(group.sum() / (rows * width))


def in_row_order(tree, order, num_generations: int):
  """Every [R, ...] leaf of `tree` with its groups (G consecutive rows) in `order` [B]."""
  def reorder(v):
    return v.reshape(-1, num_generations, *v.shape[1:])[order].reshape(v.shape)
  return jax.tree.map(reorder, tree)


def group_slots(attention_mask, completion_mask, num_generations: int, width: int,
                groups_per_row: int = 1):
  """slots [B / k, k G, L] int32 of R = B * G right-padded [prompt | completion] rows (module
  docstring); the G rows of a group hold the same prompt. A slot past `width` is dropped, so
  `width` must hold every row's k groups."""
  rows, length = attention_mask.shape
  per_row = num_generations * groups_per_row
  shape = (rows // per_row, groups_per_row, num_generations, length)
  real = attention_mask.astype(jnp.int32).reshape(shape)
  completion_len = completion_mask.astype(jnp.int32).reshape(shape).sum(-1)  # [n, k, G]
  prompt_len = real[:, :, 0].sum(-1) - completion_len[:, :, 0]               # [n, k]
  group_len = prompt_len + completion_len.sum(-1)
  group_start = jnp.cumsum(group_len, axis=1) - group_len                     # [n, k]
  start = ((group_start + prompt_len)[..., None] + jnp.cumsum(completion_len, axis=2)
           - completion_len)                                                   # [n, k, G]
  t = jnp.arange(length)
  prompt_len, group_start = prompt_len[..., None, None], group_start[..., None, None]
  slots = jnp.where(t < prompt_len, group_start + t, start[..., None] + t - prompt_len)
  return jnp.where(real > 0, slots, width).astype(jnp.int32).reshape(-1, per_row, length)


def share(values, slots, width: int, fill=0):
  """Per-row values [R, L] -> the shared rows [B / k, W] (`fill` on unused slots). The G copies
  of a prompt's entries are equal, so their duplicate writes agree."""
  n = slots.shape[0]
  scatter = lambda v, s: jnp.full((width,), fill, v.dtype).at[s].set(v, mode="drop")
  return jax.vmap(scatter)(values.reshape(n, -1), slots.reshape(n, -1))


def unshare(values, slots, mask):
  """Per-slot values [B / k, W] -> per-row [R, L], times `mask` ([B / k, k G, L] or [R, L]; 0 on
  padding, where the gathered slot is arbitrary)."""
  n, per_row, length = slots.shape
  index = jnp.minimum(slots, values.shape[1] - 1).reshape(n, -1)
  rows = jnp.take_along_axis(values, index, axis=1).reshape(n * per_row, length)
  return rows * mask.reshape(n * per_row, length).astype(rows.dtype)


def shared_rows(rows: dict, num_generations: int, width: int, targets=None,
                groups_per_row: int = 1) -> tuple[dict, jax.Array]:
  """({`input_ids`, `attention_mask`, `positions`, `branch_ids`, `loss_mask` (and
  `segment_ids` when k > 1): [B / k, W]}, slots) of rollout rows (`input_ids`,
  `attention_mask`, `positions`, `completion_mask`: [R, L]); the shared `loss_mask` (the
  positions whose stats are computed) is `targets` [R, L], by default every completion token."""
  slots = group_slots(rows["attention_mask"], rows["completion_mask"], num_generations, width,
                      groups_per_row)
  completion = rows["completion_mask"].astype(jnp.int32)
  row = jnp.arange(rows["input_ids"].shape[0])[:, None]
  fields = {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"],
            "positions": rows["positions"], "branch_ids": completion * (row % num_generations + 1),
            "loss_mask": completion if targets is None else targets.astype(jnp.int32)}
  if groups_per_row > 1:
    segment = row // num_generations % groups_per_row + 1
    fields["segment_ids"] = rows["attention_mask"].astype(jnp.int32) * segment
  return {k: share(v, slots, width) for k, v in fields.items()}, slots


def grouped_batch(rows: dict, per_row: dict, num_generations: int, width: int,
                  groups_per_row: int = 1) -> dict:
  """An update batch of whole shared rows: the `shared_*` rows [B / k, W] and `slots`
  [B / k, k G, L] of the rollout `rows` (stats computed at the per-row `loss_mask` only), and
  each `per_row` field [R, ...] as [B / k, k G, ...]."""
  shared, slots = shared_rows(rows, num_generations, width, per_row["loss_mask"], groups_per_row)
  batch = {SHARED + k: v for k, v in shared.items()}
  batch["slots"] = slots
  for k, v in per_row.items():
    batch[k] = v.reshape(slots.shape[0], slots.shape[1], *v.shape[1:])
  return batch


def is_grouped(batch: dict) -> bool:
  return "slots" in batch


def ungrouped(batch: dict) -> dict:
  """The per-row fields of a `grouped_batch` (or a minibatch of it) back as [R, ...]."""
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()
          if not k.startswith(SHARED) and k != "slots"}


def grouped_token_stats(model, params, batch: dict, **kwargs) -> dict:
  """`model_token_stats` (its keyword arguments) on the shared rows of a grouped batch, as
  per-row {`logprobs`, `entropy`: [R, L]} (0 off the batch's per-row `loss_mask`)."""
  stats = model_token_stats(model, params, batch, prefix=SHARED, **kwargs)
  return {k: unshare(stats[k], batch["slots"], batch["loss_mask"]) for k in ("logprobs", "entropy")}
