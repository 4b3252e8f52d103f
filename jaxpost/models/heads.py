"""Scalar-head model: the Llama backbone plus a linear `score` head, r = w^T h_last.

Used as a Bradley-Terry reward model (Ouyang et al. 2022) and as the PPO critic. The tree is
`{"model": backbone, "score": {"kernel": [D, 1]}}`, which exports as HF
`LlamaForSequenceClassification` (`score.weight`, num_labels=1).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxpost.models.config import LlamaConfig
from jaxpost.models.llama import LlamaModel


class LlamaForScore(nn.Module):
  """`__call__` returns per-token scores [B, T] in fp32; see `last_token_scores`."""
  cfg: LlamaConfig

  def setup(self):
    self.model = LlamaModel(self.cfg)
    self.score = nn.Dense(
        1, use_bias=False, dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)))

  def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
               branch_ids=None):
    hidden, _ = self.model(input_ids, attention_mask, positions, segment_ids,
                           branch_ids=branch_ids)
    return self.score(hidden)[..., 0].astype(jnp.float32)


def last_token_scores(token_scores, attention_mask):
  """Score at each row's last real token (rightmost position where attention_mask == 1)."""
  t = attention_mask.shape[-1]
  last = jnp.max(jnp.where(attention_mask.astype(bool), jnp.arange(t), 0), axis=-1)
  return jnp.take_along_axis(token_scores, last[:, None], axis=-1)[:, 0]
