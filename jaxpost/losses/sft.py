"""Supervised finetuning loss: mean token NLL over the trainable tokens of the whole batch.

    L = - sum_{b,t} m_bt log p_theta(x_bt | x_b,<t)  /  sum_{b,t} m_bt

with m = `loss_mask` (1 on completion / assistant tokens; 0 forced at the first token of each
packed segment). Each microbatch returns its own mean
and its weight sum(m); the training loop combines microbatches as sum_i w_i L_i / sum_i w_i,
which is exactly L over the whole accumulated batch (not a mean of per-microbatch means).

NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): during
training only, the token embeddings get uniform noise

    e <- e + (alpha / sqrt(T * D)) * u,    u ~ Uniform(-1, 1)^{B x T x D}

with T the (padded) sequence length and D the hidden size, as in the paper's Algorithm 1 and
the transformers/TRL hook. Enabled by `config.neftune_alpha > 0`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.losses.logprobs import model_token_stats


def neftune_hook(rng, alpha: float):
  """The embedding rewrite e -> e + alpha / sqrt(T*D) * Uniform(-1, 1) noise."""

  def hook(embeddings):
    t, d = embeddings.shape[-2:]
    scale = alpha / jnp.sqrt(float(t * d))
    noise = jax.random.uniform(rng, embeddings.shape, jnp.float32, -1.0, 1.0) * scale
    return embeddings + noise.astype(embeddings.dtype)

  return hook


def target_mask(batch) -> jax.Array:
  """`loss_mask` as float, never counting the first token of a packed segment (its prefix
  would be the previous example)."""
  mask = batch["loss_mask"].astype(jnp.float32)
  if "segment_ids" not in batch:
    return mask
  seg = batch["segment_ids"]
  starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  return jnp.where(starts, 0.0, mask)


def num_targets(batch) -> jax.Array:
  """Weight of a (micro)batch: its number of trainable target tokens."""
  return jnp.sum(target_mask(batch))


def masked_mean(values, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sft_loss(params, frozen, batch, rng, ctx):
  """(mean NLL over this microbatch's trainable tokens, metrics). See the module docstring."""
  del frozen
  alpha = float(ctx.config.get("neftune_alpha", 0.0))
  training = ctx.training and rng is not None
  noise_rng, dropout_rng = jax.random.split(rng) if training else (None, None)
  hook = neftune_hook(noise_rng, alpha) if training and alpha > 0 else None
  stats = model_token_stats(ctx.model, params, batch, chunk_size=ctx.config.logprob_chunk_size,
                            embed_hook=hook, dropout_rng=dropout_rng)
  mask = target_mask(batch)
  loss = -masked_mean(stats["logprobs"], mask)
  metrics = {
      "mean_token_accuracy": masked_mean(stats["correct"], mask),
      "entropy": masked_mean(stats["entropy"], mask),
  }
  return loss, metrics
