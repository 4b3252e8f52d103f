"""Chunked token log-probabilities: the fp32 [B, T, V] logits never exist for the whole batch.

For hidden states h (the model's final normed hidden, [B, T, D]) and output kernel W ([D, V]),

    log p(x_t | x_<t) = z_{t-1}[x_t] - logsumexp(z_{t-1}),      z_t = h_t W   (fp32)

and out[:, 0] = 0 (the first token has no prefix). The sequence axis is cut into chunks of
`chunk_size` positions; each chunk's logits are computed under `jax.checkpoint`, so the forward
pass keeps only O(B * chunk * V) logits alive and the backward pass recomputes them chunk by
chunk instead of storing them (the "levers" in DESIGN.md; as in Liger's fused linear
cross-entropy, Hsu et al. 2024).

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

DEFAULT_CHUNK_SIZE = 128


def _chunk_stats(h, kernel, targets):
  """Stats of one chunk: h [B, C, D], targets [B, C] -> dict of [B, C] fp32 arrays."""
  logits = jnp.einsum("bcd,dv->bcv", h, kernel.astype(h.dtype),
                      preferred_element_type=jnp.float32)
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


def token_stats(hidden, kernel, input_ids, chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict:
  """Per-token stats [B, T] (fp32): `logprobs` (differentiable), `correct`, `entropy`,
  `logit_mean` — all describing the prediction of input_ids[:, t] from hidden[:, t-1]; 0 at t=0.
  """
  b, t, d = hidden.shape
  if input_ids.shape != (b, t):
    raise ValueError(f"input_ids shape {input_ids.shape} does not match hidden {hidden.shape}")
  # Position t is predicted from hidden t-1: shift hidden right by one (zeros at t=0).
  h = jnp.concatenate([jnp.zeros_like(hidden[:, :1]), hidden[:, :-1]], axis=1)
  chunk = max(1, min(chunk_size, t))
  num_chunks = -(-t // chunk)
  pad = num_chunks * chunk - t
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
  ids = jnp.pad(input_ids, ((0, 0), (0, pad)))
  h = h.reshape(b, num_chunks, chunk, d).swapaxes(0, 1)
  ids = ids.reshape(b, num_chunks, chunk).swapaxes(0, 1)
  stats_fn = jax.checkpoint(_chunk_stats)
  out = jax.lax.map(lambda xs: stats_fn(xs[0], kernel, xs[1]), (h, ids))
  first = (jnp.arange(t) > 0).astype(jnp.float32)
  return {k: v.swapaxes(0, 1).reshape(b, -1)[:, :t] * first for k, v in out.items()}


def token_logprobs(hidden, kernel, input_ids, chunk_size: int = DEFAULT_CHUNK_SIZE):
  """[B, T] fp32 with out[:, t] = log p(input_ids[:, t] | input_ids[:, :t]); out[:, 0] = 0."""
  return token_stats(hidden, kernel, input_ids, chunk_size)["logprobs"]


def sequence_logprobs(token_lp, loss_mask, average: bool = False):
  """Sum over trainable tokens, [B]; `average` divides by their count (0 for empty rows)."""
  mask = loss_mask.astype(jnp.float32)
  total = jnp.sum(token_lp * mask, axis=-1)
  if not average:
    return total
  return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def model_token_stats(model, params, batch: dict, prefix: str = "",
                      chunk_size: int = DEFAULT_CHUNK_SIZE,
                      embed_hook: Optional[Callable] = None, dropout_rng=None) -> dict:
  """`token_stats` of a causal LM on the batch fields `{prefix}input_ids`, `..attention_mask`,
  `..positions`, `..segment_ids`. `embed_hook(embeddings) -> embeddings` rewrites the token
  embeddings (e.g. NEFTune noise) through a Flax method interceptor, so the model needs no flag.
  `dropout_rng` (training only) drives LoRA adapter dropout."""
  ids = batch[prefix + "input_ids"]
  args = (ids, batch[prefix + "attention_mask"], batch.get(prefix + "positions"),
          batch.get(prefix + "segment_ids"))
  with _intercept_embeddings(embed_hook):
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    hidden = model.apply({"params": params}, *args, method="hidden_states", rngs=rngs)
  return token_stats(hidden, output_kernel(params, model.cfg), ids, chunk_size)


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
