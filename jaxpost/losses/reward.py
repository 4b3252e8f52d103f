"""Bradley–Terry reward-model loss on scalar scores of chosen and rejected responses.

With r_c, r_r the scores [B] of the chosen and rejected responses (the score head at each
sequence's last real token) and m an optional per-pair margin [B] (Touvron et al. 2023, Llama 2),

    loss = mean(-log σ(r_c - r_r - m)) + c · mean((r_c + r_r)²)

The first term is the Bradley–Terry negative log-likelihood of the observed preference
(Bradley & Terry 1952; Ouyang et al. 2022); the second, with c = `center_rewards_coefficient`,
pulls the rewards towards zero mean (Eisenstein et al. 2023). Metrics follow TRL's RewardTrainer:
`accuracy` = mean[r_c > r_r], `margin` = mean(r_c - r_r), and `mean_reward` / `min_reward` /
`max_reward` over all 2B scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None,
                       center_rewards_coefficient: float | None = None):
  """-> (scalar loss, metrics dict of scalars); see the module docstring."""
  if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
    raise ValueError(
        f"config.center_rewards_coefficient must be >= 0 or None, got {center_rewards_coefficient}")
  rc = jnp.asarray(chosen_rewards, jnp.float32)
  rr = jnp.asarray(rejected_rewards, jnp.float32)
  diff = rc - rr
  m = 0.0 if margin is None else jnp.asarray(margin, jnp.float32)
  loss = -jnp.mean(jax.nn.log_sigmoid(diff - m))
  if center_rewards_coefficient:
    loss = loss + center_rewards_coefficient * jnp.mean((rc + rr) ** 2)
  both = jnp.concatenate([rc, rr])
  metrics = {
      "accuracy": jnp.mean((diff > 0).astype(jnp.float32)),
      "margin": jnp.mean(diff),
      "mean_reward": jnp.mean(both),
      "min_reward": jnp.min(both),
      "max_reward": jnp.max(both),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
