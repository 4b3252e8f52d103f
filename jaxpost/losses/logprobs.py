"""Chunked token log-probabilities, computed only at the trainable target positions.

For hidden states h (the model's final normed hidden, [B, T, D]) and output kernel W ([D, V]),

    log p(x_t | x_<t) = z_{t-1}[x_t] - logsumexp(z_{t-1}),      z_t = h_t W / T   (fp32)

and out[:, 0] = 0 (the first token has no prefix). T is the `temperature` (1 by default; rollout
algorithms score their samples at the sampling temperature).

Chunks. The logits are computed B * chunk_size positions at a time (`chunk_size` positions per
row's worth, so a chunk's fp32 logits are [B * chunk_size, V]); the backward pass recomputes
each chunk's logits instead of storing them (a custom VJP whose residuals are only the inputs),
so one chunk of logits is alive at a time (the "levers" in DESIGN.md; as in Liger's fused linear cross-entropy,
Hsu et al. 2024).

Targets only. With a `mask` [B, T] (the batch's `loss_mask`) only positions with mask > 0 are
wanted. The LM head costs 2 D V FLOPs per position (about a fifth of a small model's step) and
in SFT/DPO most positions are prompt. So the rows are split into G groups of B / G consecutive
rows, each group's positions are flattened and its wanted ones moved to the front (a stable
argsort on mask == 0: a fixed-size permutation, shapes stay static), and chunks of
B * chunk_size positions (chunk_size * B / G per group) are computed in a loop whose trip count
is traced: with K_g wanted positions in group g, only ceil(max_g K_g / (chunk_size * B / G))
chunks run, forward and backward (the same loop structure in both, so it also works inside
`lax.scan`; it is reverse-mode only, no `jax.jvp`). G = 1 packs the wanted positions of the
whole batch most tightly; G = B sorts within rows only, which keeps every op row-local, so a
batch sharded over devices stays sharded (with G = 1 each device would compute the whole
batch's head). The default picks G = 1 on one device and G = B on several. The stats are put
back in place; positions with mask == 0 get 0 (and no gradient).

`token_stats` also returns per-token diagnostics that TRL logs (argmax accuracy, entropy, mean
logit); they carry no gradient.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpost.models.llama import output_kernel

DEFAULT_CHUNK_SIZE = 32
STATS = ("logprobs", "correct", "entropy", "logit_mean")


def _chunk_stats(h, kernel, targets, temperature):
  """Stats of one chunk: h [G, C, D], targets [G, C] -> dict of [G, C] fp32 arrays of the
  distribution softmax(h W / temperature)."""
  logits = jnp.dot(h.reshape(-1, h.shape[-1]), kernel.astype(h.dtype),  # 2-D: see lora.dense
                   preferred_element_type=jnp.float32).reshape(*targets.shape, -1) / temperature
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  logits_ng = jax.lax.stop_gradient(logits)
  probs = jnp.exp(logits_ng - jax.lax.stop_gradient(lse)[..., None])
  return {
      "logprobs": target_logit - lse,
      "correct": (jnp.argmax(logits_ng, axis=-1) == targets).astype(jnp.float32),
      "entropy": jax.lax.stop_gradient(lse) - jnp.sum(probs * logits_ng, axis=-1),
      "logit_mean": jnp.mean(logits_ng, axis=-1),
  }


@jax.custom_vjp
def _live_chunk_stats(h, kernel, ids, num_live, temperature):
  """`_chunk_stats` of chunks i < num_live of h [N, G, C, D] / ids [N, G, C] -> [N, G, C] stats,
  zeros for the rest: a loop with a traced trip count, so skipped chunks cost nothing."""
  def body(i, out):
    stats = _chunk_stats(h[i], kernel, ids[i], temperature)
    return {k: out[k].at[i].set(stats[k]) for k in STATS}
  return jax.lax.fori_loop(0, num_live, body, {k: jnp.zeros(ids.shape, jnp.float32) for k in STATS})


def _live_chunk_stats_fwd(h, kernel, ids, num_live, temperature):
  return (_live_chunk_stats(h, kernel, ids, num_live, temperature),
          (h, kernel, ids, num_live, temperature))


def _live_chunk_stats_bwd(res, cotangents):
  """Recomputes each live chunk's logits and pulls back the `logprobs` cotangent (the other stats
  carry no gradient, nor does the temperature); the kernel gradient is summed over chunks in
  fp32."""
  h, kernel, ids, num_live, temperature = res

  def body(i, grads):
    d_h, d_kernel = grads
    logprobs = lambda x, w: _chunk_stats(x, w, ids[i], temperature)["logprobs"]
    d_hi, d_ki = jax.vjp(logprobs, h[i], kernel)[1](cotangents["logprobs"][i])
    return d_h.at[i].set(d_hi), d_kernel + d_ki.astype(jnp.float32)

  init = (jnp.zeros_like(h), jnp.zeros(kernel.shape, jnp.float32))
  d_h, d_kernel = jax.lax.fori_loop(0, num_live, body, init)
  return d_h, d_kernel.astype(kernel.dtype), None, None, jnp.zeros_like(temperature)


_live_chunk_stats.defvjp(_live_chunk_stats_fwd, _live_chunk_stats_bwd)


def token_stats(hidden, kernel, input_ids, chunk_size: int = DEFAULT_CHUNK_SIZE, mask=None,
                groups: Optional[int] = None, temperature: float = 1.0) -> dict:
  """Per-token stats [B, T] (fp32): `logprobs` (differentiable), `correct`, `entropy`,
  `logit_mean` — all describing the prediction of input_ids[:, t] from hidden[:, t-1]; 0 at t=0.

  `chunk_size`: positions per row in one chunk, i.e. B * chunk_size tokens' logits alive at once.
  `mask` [B, T] (optional): stats only where mask > 0, 0 elsewhere; the LM head runs only on the
  chunks needed for them. `groups` (dividing B): the wanted positions are packed within that many
  groups of consecutive rows; None picks 1 on one device, B on several (module docstring).
  `temperature` T > 0: the stats are those of softmax(logits / T).
  """
  b, t, _ = hidden.shape
  if input_ids.shape != (b, t):
    raise ValueError(f"input_ids shape {input_ids.shape} does not match hidden {hidden.shape}")
  if mask is not None and mask.shape != (b, t):
    raise ValueError(f"mask shape {mask.shape} does not match input_ids {input_ids.shape}")
  groups = (1 if jax.device_count() == 1 else b) if groups is None else groups
  if groups < 1 or b % groups:
    raise ValueError(f"groups={groups} does not divide the batch's {b} rows")
  wanted = jnp.broadcast_to(jnp.arange(t) > 0, (b, t))
  if mask is not None:
    wanted = wanted & (mask > 0)
  # Position t is predicted from hidden t-1: shift hidden right by one (zeros at t=0).
  h = jnp.concatenate([jnp.zeros_like(hidden[:, :1]), hidden[:, :-1]], axis=1)
  grouped = lambda x: x.reshape(groups, -1, *x.shape[2:])  # [G, (B / G) * T, ...]
  out = _compacted_stats(grouped(h), kernel, grouped(input_ids), grouped(wanted),
                         max(1, min(chunk_size, t)) * (b // groups),
                         jnp.asarray(temperature, jnp.float32))
  return {k: v.reshape(b, t) * wanted for k, v in out.items()}


def _compacted_stats(h, kernel, ids, wanted, chunk: int, temperature) -> dict:
  """`_chunk_stats` of the wanted positions of each group (row) of h [G, N, D], ids / wanted
  [G, N], chunk by chunk of [G, chunk] positions with the wanted ones moved first; [G, N] out."""
  g, n = wanted.shape
  num_chunks = -(-n // chunk)
  # Each group's wanted positions first (stable: in order), padded to whole chunks with index 0.
  order = jnp.pad(jnp.argsort(~wanted, axis=1, stable=True), ((0, 0), (0, num_chunks * chunk - n)))
  num_live = -(-jnp.max(jnp.sum(wanted, axis=1)) // chunk)  # chunks holding a wanted position
  h = jnp.take_along_axis(h, order[..., None], axis=1)
  ids = jnp.take_along_axis(ids, order, axis=1)
  split = lambda x: x.reshape(g, num_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)
  out = _live_chunk_stats(split(h), kernel, split(ids), num_live, temperature)
  inverse = jnp.argsort(order[:, :n], axis=1)
  unsort = lambda v: jnp.take_along_axis(v.swapaxes(0, 1).reshape(g, -1), inverse, axis=1)
  return {k: unsort(v) for k, v in out.items()}


def token_logprobs(hidden, kernel, input_ids, chunk_size: int = DEFAULT_CHUNK_SIZE, mask=None,
                   temperature: float = 1.0):
  """[B, T] fp32 with out[:, t] = log p(input_ids[:, t] | input_ids[:, :t]) at `temperature`;
  out[:, 0] = 0 (and 0 where `mask` == 0 when a mask is given)."""
  return token_stats(hidden, kernel, input_ids, chunk_size, mask,
                     temperature=temperature)["logprobs"]


def sequence_logprobs(token_lp, loss_mask, average: bool = False):
  """Sum over trainable tokens, [B]; `average` divides by their count (0 for empty rows)."""
  mask = loss_mask.astype(jnp.float32)
  total = jnp.sum(token_lp * mask, axis=-1)
  if not average:
    return total
  return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def model_token_stats(model, params, batch: dict, prefix: str = "",
                      chunk_size: int = DEFAULT_CHUNK_SIZE,
                      embed_hook: Optional[Callable] = None, dropout_rng=None,
                      targets_only: bool = True, temperature: float = 1.0,
                      return_hidden: bool = False) -> dict:
  """`token_stats` of a causal LM on the batch fields `{prefix}input_ids`, `..attention_mask`,
  `..positions`, `..segment_ids`. With `targets_only` and a `{prefix}loss_mask` field, stats are
  computed only at its trainable targets (0 elsewhere); `targets_only=False` (or no loss_mask)
  computes every position. `embed_hook(embeddings) -> embeddings` rewrites the token
  embeddings (e.g. NEFTune noise) through a Flax method interceptor, so the model needs no flag.
  `dropout_rng` (training only) drives LoRA adapter dropout. `temperature`: see `token_stats`.
  `return_hidden` adds the final hidden states [B, T, D] as "hidden" (a value head on the same
  forward: PPO's shared-backbone critic)."""
  ids = batch[prefix + "input_ids"]
  args = (ids, batch[prefix + "attention_mask"], batch.get(prefix + "positions"),
          batch.get(prefix + "segment_ids"))
  with _intercept_embeddings(embed_hook):
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    hidden = model.apply({"params": params}, *args, method="hidden_states", rngs=rngs)
  mask = batch.get(prefix + "loss_mask") if targets_only else None
  stats = token_stats(hidden, output_kernel(params, model.cfg), ids, chunk_size, mask,
                      temperature=temperature)
  return {**stats, "hidden": hidden} if return_hidden else stats


@contextlib.contextmanager
def _intercept_embeddings(hook):
  """Applies `hook` to the output of every `nn.Embed.__call__` (not `attend`) in the context."""
  if hook is None:
    yield
    return

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
      return hook(out)
    return out

  with nn.intercept_methods(interceptor):
    yield
