"""Per-token KL(π ‖ π_ref) estimators and the KL-coefficient controllers of RL from feedback.

With samples y_t ~ π and Δ_t = log π_ref(y_t|s_t) − log π(y_t|s_t), clamped to [−20, 20] so that
exp(Δ) stays finite, the three estimators of Schulman (2020, "Approximating KL Divergence") are

    k1 = −Δ                  unbiased, high variance, can be negative
    k2 = ½ Δ²                biased (exact to second order), ≥ 0
    k3 = exp(Δ) − Δ − 1      unbiased, ≥ 0 (exp(x) ≥ 1 + x), low variance

all [B, T] fp32 and differentiable in both log-probs. RLOO puts k1 (of the old policy) into the
reward; GRPO adds β·k3 to the per-token loss; PPO-RLHF uses k1 as a per-token reward.

Controllers. The coefficient β is a traced fp32 scalar (it lives in `TrainState.extra`, so it
resumes, and a jitted step never closes over it as a Python constant). The fixed controller keeps
it; the adaptive one (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
§2.2) moves it towards a target KL after each iteration of n samples:

    e = clip(KL / KL_target − 1, −0.2, 0.2),      β ← β (1 + e · n / horizon)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

LOG_RATIO_CLAMP = 20.0
ESTIMATORS = ("k1", "k2", "k3")
PROPORTIONAL_ERROR_CLIP = 0.2


def ref_log_ratio(logps, ref_logps):
  """Δ = clip(log π_ref − log π, ±20), fp32, [B, T]."""
  delta = jnp.asarray(ref_logps, jnp.float32) - jnp.asarray(logps, jnp.float32)
  return jnp.clip(delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def k1(logps, ref_logps):
  """k1 = −Δ = log π − log π_ref (per token)."""
  return -ref_log_ratio(logps, ref_logps)


def k2(logps, ref_logps):
  """k2 = ½ Δ² (per token)."""
  return 0.5 * jnp.square(ref_log_ratio(logps, ref_logps))


def k3(logps, ref_logps):
  """k3 = exp(Δ) − Δ − 1 (per token), ≥ 0."""
  delta = ref_log_ratio(logps, ref_logps)
  return jnp.expm1(delta) - delta


def kl_estimate(logps, ref_logps, estimator: str = "k3"):
  """The named per-token estimator ("k1" | "k2" | "k3") of KL(π ‖ π_ref)."""
  if estimator not in ESTIMATORS:
    raise ValueError(f"KL estimator must be one of {ESTIMATORS}, got {estimator!r}")
  return {"k1": k1, "k2": k2, "k3": k3}[estimator](logps, ref_logps)


def adaptive_kl_coef(beta, kl, num_samples, target, horizon):
  """One adaptive update (module docstring): β (1 + clip(KL/target − 1, ±0.2) · n / horizon).
  Every argument may be traced; returns an fp32 scalar."""
  error = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0,
                   -PROPORTIONAL_ERROR_CLIP, PROPORTIONAL_ERROR_CLIP)
  return jnp.asarray(beta, jnp.float32) * (1.0 + error * num_samples / horizon)


@dataclasses.dataclass(frozen=True)
class KLController:
  """β's schedule: fixed at `init_coef` when `target` is None, else adaptive (Ziegler et al. 2019)
  towards a KL of `target` (in the units the caller measures, e.g. nats per sequence), with
  `horizon` samples as the time constant."""
  init_coef: float
  target: Optional[float] = None
  horizon: float = 10000.0

  def __post_init__(self):
    if self.init_coef < 0:
      raise ValueError(f"KL coefficient must be >= 0, got {self.init_coef}")
    if self.target is not None and not self.target > 0:
      raise ValueError(f"KL target must be > 0 (or None for a fixed coefficient), got {self.target}")
    if not self.horizon > 0:
      raise ValueError(f"KL horizon must be > 0, got {self.horizon}")

  @property
  def adaptive(self) -> bool:
    return self.target is not None

  def initial(self) -> jax.Array:
    """The coefficient to store in `TrainState.extra` at step 0 (fp32 scalar)."""
    return jnp.asarray(self.init_coef, jnp.float32)

  def update(self, beta, kl, num_samples) -> jax.Array:
    """The next coefficient after an iteration of `num_samples` samples with measured `kl`."""
    if not self.adaptive:
      return jnp.asarray(beta, jnp.float32)
    return adaptive_kl_coef(beta, kl, num_samples, self.target, self.horizon)
