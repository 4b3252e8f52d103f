"""Prefix sharing for rollout groups: the G completions of one prompt in ONE row.

A rollout (algos/rollout.py) lays its R = B * G rows out as [prompt | completion] [R, L], so
every forward over them (the update, the π_old recompute, the reference pass) computes each
prompt G times. With prefix sharing (DESIGN "Prefix sharing"; Wang et al. 2024, applied to
groups as in the DPO pairs) group i becomes one row of W = L + (G - 1) * N slots

    [prompt_i | y_i1 | y_i2 | ... | y_iG | pad]      branch_ids 0 | 1 | 2 | ... | G | 0

(N = max_new_tokens, so W fits G completions of any length; the completions are packed tight,
the padding is at the end). Once the lengths are sampled, the update narrows W to L - N + S:
S completion slots, the longest group's total completion length rounded up to a
quarter of G N (`completion_slots`: at most 4 widths, so at most 4 compilations). Completion j
sees the prompt and itself only (models/llama.py's branch rule) and its positions continue from
the prompt's end, so each token's log-prob is the one its unshared row gives;
`losses/logprobs.predecessor_index` reads the first token of y_ij from the last prompt slot.

`slots` [B, G, L] maps position t of row (i, j) to its slot in shared row i (W, out of range,
on the row's padding): `share` scatters per-row values into the shared rows, `unshare` gathers
per-slot results back to [R, L], so the losses keep reading [R, L] arrays. An update batch
(`grouped_batch`) keeps one leading entry per GROUP ([B, G, ...] per-row fields next to the
`shared_*` rows), so minibatches, gradient accumulation and the mesh split whole groups.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.losses.logprobs import model_token_stats

SHARED = "shared_"  # prefix of the shared-row fields in an update batch


def completion_slots(completion_lengths, num_generations: int, max_new_tokens: int,
                     buckets: int = 4) -> int:
  """S of the module docstring from the sampled lengths [R] (host values): the longest group's
  total completion length, rounded up to a multiple of G N / `buckets` (at least one)."""
  lengths = np.asarray(completion_lengths).reshape(-1, num_generations).sum(-1)
  area = num_generations * max_new_tokens
  step = -(-area // buckets)
  return int(min(area, step * max(1, -(-int(lengths.max()) // step))))


def group_slots(attention_mask, completion_mask, num_generations: int, max_new_tokens: int,
                slots_after_prompt: Optional[int] = None):
  """(slots [B, G, L] int32, width W) of R = B * G right-padded [prompt | completion] rows
  (module docstring); the G rows of a group hold the same prompt. W = L - N +
  `slots_after_prompt` (None: G N); a completion slot past W is dropped, so that must fit
  every group's total completion length."""
  rows, length = attention_mask.shape
  g = num_generations
  real = attention_mask.astype(jnp.int32).reshape(rows // g, g, length)
  completion = completion_mask.astype(jnp.int32).reshape(real.shape)
  completion_len = completion.sum(-1)                                       # [B, G]
  prompt_len = (real.sum(-1) - completion_len)[:, :1, None]                  # [B, 1, 1]
  start = prompt_len[..., 0] + jnp.cumsum(completion_len, axis=1) - completion_len  # [B, G]
  width = length - max_new_tokens + (slots_after_prompt or g * max_new_tokens)
  t = jnp.arange(length)
  slots = jnp.where(t < prompt_len, t, start[..., None] + t - prompt_len)
  return jnp.where(real > 0, slots, width).astype(jnp.int32), width


def share(values, slots, width: int, fill=0):
  """Per-row values [R, L] -> the shared rows [B, W] (`fill` on unused slots). The G copies of a
  prompt's entries are equal, so their duplicate writes agree."""
  b = slots.shape[0]
  scatter = lambda v, s: jnp.full((width,), fill, v.dtype).at[s].set(v, mode="drop")
  return jax.vmap(scatter)(values.reshape(b, -1), slots.reshape(b, -1))


def unshare(values, slots, mask):
  """Per-slot values [B, W] -> per-row [B * G, L], times `mask` ([B, G, L] or [R, L]; 0 on
  padding, where the gathered slot is arbitrary)."""
  b, g, length = slots.shape
  index = jnp.minimum(slots, values.shape[1] - 1).reshape(b, -1)
  rows = jnp.take_along_axis(values, index, axis=1).reshape(b * g, length)
  return rows * mask.reshape(b * g, length).astype(rows.dtype)


def shared_rows(rows: dict, num_generations: int, max_new_tokens: int, targets=None,
                slots_after_prompt: Optional[int] = None) -> tuple[dict, jax.Array]:
  """({`input_ids`, `attention_mask`, `positions`, `branch_ids`, `loss_mask`: [B, W]}, slots)
  of rollout rows (`input_ids`, `attention_mask`, `positions`, `completion_mask`: [R, L]); the
  shared `loss_mask` (the positions whose stats are computed) is `targets` [R, L], by default
  every completion token; W as `group_slots`."""
  slots, width = group_slots(rows["attention_mask"], rows["completion_mask"], num_generations,
                             max_new_tokens, slots_after_prompt)
  completion = rows["completion_mask"].astype(jnp.int32)
  branch = completion * (jnp.arange(rows["input_ids"].shape[0]) % num_generations + 1)[:, None]
  fields = {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"],
            "positions": rows["positions"], "branch_ids": branch,
            "loss_mask": completion if targets is None else targets.astype(jnp.int32)}
  return {k: share(v, slots, width) for k, v in fields.items()}, slots


def grouped_batch(rows: dict, per_row: dict, num_generations: int, max_new_tokens: int,
                  slots_after_prompt: Optional[int] = None) -> dict:
  """An update batch of whole groups: the `shared_*` rows [B, W] (W as `group_slots`) and
  `slots` [B, G, L] of the rollout `rows` (stats computed at the per-row `loss_mask` only), and
  each `per_row` field [R, ...] as [B, G, ...]."""
  shared, slots = shared_rows(rows, num_generations, max_new_tokens, per_row["loss_mask"],
                              slots_after_prompt)
  batch = {SHARED + k: v for k, v in shared.items()}
  batch["slots"] = slots
  for k, v in per_row.items():
    batch[k] = v.reshape(v.shape[0] // num_generations, num_generations, *v.shape[1:])
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
