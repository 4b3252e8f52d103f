"""PPO for RL from human feedback: per-token rewards, GAE, whitening, the clipped losses.

Notation (DESIGN.md "Formulas"): rows [R, T] of [prompt | completion], m_t the completion mask
(1 up to and including EOS, 0 on the prompt and padding), log-probs per token fp32 at the
sampling temperature, ρ_t = exp(log π_θ(y_t) − log π_old(y_t)), V_t the critic's value of the
state before token t (the critic's output at position t − 1), t_last the last position with
m_t = 1.

Per-token reward (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences";
Ouyang et al. 2022, InstructGPT; Stiennon et al. 2020):

    r_t = −β KL_t + [t = t_last] · R,     KL_t = k1 or k3 of (π_old ‖ π_ref) (`kl.py`)

with R the sequence score after `shape_scores`: R − missing_eos_penalty for a completion that
hit max_new_tokens without EOS, then clipped to [−reward_clip, reward_clip].

Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
Using Generalized Advantage Estimation"), as a reverse `lax.scan` over positions, V = 0 after
the last token:

    δ_t = r_t + γ V_{t+1} − V_t,      A_t = δ_t + γ λ A_{t+1},      R̂_t = A_t + V_t

so with γ = λ = 1, A_t = Σ_{s≥t} r_s − V_t (reward-to-go minus the value).

Masked whitening (as TRL): x̂ = (x − mean_m x) / sqrt(var_m x + 1e-8), with the unbiased
(Bessel-corrected) masked variance; `shift_mean=False` adds the mean back (TRL's reward
whitening).

Clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms") with an
optional dual clip c > 1 (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep
Reinforcement Learning"), masked token mean:

    l_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε)),  with dual clip for A_t < 0: min(l_t, −c A_t)

Clipped value loss (as in OpenAI's baselines and TRL), V_clip = clip(V, V_old − ε_v, V_old + ε_v):

    L_v = ½ mean_m max((V − R̂)², (V_clip − R̂)²)

The minimised total (Schulman et al. 2017, eq. 9, with the entropy bonus c_H = `ent_coef`, 0 by
default as in TRL, which has none), H_t the entropy of π_θ(· | y_<t) at the sampling temperature:

    L = L_pg + vf_coef · L_v − c_H · mean_m H_t

Metrics (TRL's PPO names): `policy/approxkl_avg` = ½ mean_m (log ρ)², `policy/clipfrac_avg` =
mean_m [clipped term > unclipped], `val/clipfrac_avg` likewise for the value loss, `val/ratio` =
mean_m ρ, `loss/policy_avg`, `loss/value_avg`. TRL takes approxkl and the ratio mean over every
position of the completion block (padding counts as ρ = 1); here they are means over m.
Explained variance of the critic: 1 − Var_m[R̂ − V] / Var_m[R̂].
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from jaxpost.losses import kl as kl_lib
from jaxpost.losses.sft import masked_mean  # Σ m x / Σ m (0 when the mask is empty)

WHITEN_EPS = 1e-8
KL_ESTIMATORS = ("k1", "k3")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """The loss keys of config.ppo (TRL experimental PPOConfig names and defaults where it has
  them). kl_target None: fixed β; else Ziegler's adaptive controller (module `kl.py`)."""
  gamma: float = 1.0
  lam: float = 0.95
  cliprange: float = 0.2
  cliprange_value: float = 0.2
  vf_coef: float = 0.1
  kl_coef: float = 0.05
  kl_estimator: str = "k1"
  kl_target: Optional[float] = None
  kl_horizon: float = 10000.0
  whiten_rewards: bool = False
  missing_eos_penalty: Optional[float] = None
  reward_clip: Optional[float] = None
  dual_clip: Optional[float] = None
  ent_coef: float = 0.0

  def __post_init__(self):
    def bad(key, why):
      raise ValueError(f"config.ppo.{key}={getattr(self, key)!r} {why}")
    for key in ("gamma", "lam"):
      if not 0.0 <= getattr(self, key) <= 1.0:
        bad(key, "must be in [0, 1]")
    for key in ("cliprange", "cliprange_value"):
      if not getattr(self, key) > 0:
        bad(key, "must be > 0")
    for key in ("vf_coef", "ent_coef"):
      if getattr(self, key) < 0:
        bad(key, "must be >= 0")
    if self.kl_estimator not in KL_ESTIMATORS:
      bad("kl_estimator", f"must be one of {KL_ESTIMATORS}")
    if self.reward_clip is not None and not self.reward_clip > 0:
      bad("reward_clip", "must be > 0 (or None: no clipping)")
    if self.dual_clip is not None and not self.dual_clip > 1:
      bad("dual_clip", "must be > 1 (or None: off)")
    try:
      self.controller()
    except ValueError as err:
      raise ValueError(f"config.ppo.kl_coef / kl_target / kl_horizon: {err}") from err

  def controller(self) -> kl_lib.KLController:
    return kl_lib.KLController(self.kl_coef, self.kl_target, self.kl_horizon)


# --- masked statistics ---------------------------------------------------------------------------

def masked_var(x, mask, unbiased: bool = True):
  """Masked variance about the masked mean; unbiased: times n / (n − 1)."""
  mask = jnp.asarray(mask, jnp.float32)
  var = masked_mean(jnp.square(x - masked_mean(x, mask)), mask)
  if unbiased:
    n = jnp.sum(mask)
    var = var * n / jnp.maximum(n - 1.0, 1.0)
  return var


def masked_whiten(x, mask, shift_mean: bool = True):
  """(x − mean_m) / sqrt(var_m + 1e-8), var unbiased; `shift_mean=False` keeps the mean.
  Values off the mask are transformed too (callers zero them)."""
  mean = masked_mean(x, mask)
  white = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + WHITEN_EPS)
  return white if shift_mean else white + mean


def explained_variance(values, returns, mask):
  """1 − Var_m[R̂ − V] / Var_m[R̂] (1: perfect critic, 0: no better than the mean)."""
  var = masked_var(returns, mask, unbiased=False)
  return 1.0 - masked_var(returns - values, mask, unbiased=False) / jnp.maximum(var, 1e-8)


# --- rewards and advantages ----------------------------------------------------------------------

def last_token_onehot(mask):
  """[R, T] one-hot of each row's last position with mask > 0 (all 0 for an empty row)."""
  t = mask.shape[-1]
  on = mask > 0
  last = jnp.max(jnp.where(on, jnp.arange(t), -1), axis=-1)
  return (jnp.arange(t)[None, :] == last[:, None]).astype(jnp.float32)


def shape_scores(scores, finished, missing_eos_penalty=None, reward_clip=None):
  """R − penalty for completions without EOS (`finished` False), then clip to ±reward_clip."""
  scores = jnp.asarray(scores, jnp.float32)
  if missing_eos_penalty is not None:
    scores = scores - missing_eos_penalty * (1.0 - finished.astype(jnp.float32))
  if reward_clip is not None:
    scores = jnp.clip(scores, -reward_clip, reward_clip)
  return scores


def token_rewards(scores, logps, ref_logps, mask, kl_coef, estimator: str = "k1"):
  """(r [R, T], KL_t [R, T]): r_t = −β KL_t m_t + [t = t_last] R (module docstring). `kl_coef`
  may be traced; `ref_logps` None means no KL term (KL_t = 0)."""
  mask = jnp.asarray(mask, jnp.float32)
  if ref_logps is None:
    kl = jnp.zeros_like(mask)
  else:
    kl = kl_lib.kl_estimate(logps, ref_logps, estimator) * mask
  rewards = -jnp.asarray(kl_coef, jnp.float32) * kl
  return rewards + last_token_onehot(mask) * jnp.asarray(scores, jnp.float32)[:, None], kl


def gae(rewards, values, mask, gamma: float, lam: float):
  """(advantages, returns) [R, T] by GAE as a reverse scan over positions (module docstring);
  masked positions carry nothing (A = R̂ = 0 there), so V = 0 after the last token and the
  prompt positions before the completion do not leak into it."""
  mask = jnp.asarray(mask, jnp.float32)
  rewards, values = rewards * mask, values * mask

  def back(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs
    adv = (r + gamma * next_value - v + gamma * lam * next_adv) * m
    return (v, adv), adv

  zeros = jnp.zeros(rewards.shape[0], jnp.float32)
  _, adv = jax.lax.scan(back, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
  adv = adv.T
  return adv, (adv + values) * mask


# --- the losses ----------------------------------------------------------------------------------

def policy_loss(logps, old_logps, advantages, mask, cliprange: float,
                dual_clip: Optional[float] = None):
  """(L_pg, metrics): the clipped surrogate (with dual clip), masked token mean."""
  mask = jnp.asarray(mask, jnp.float32)
  log_ratio = (logps - old_logps) * mask
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
  per_token = jnp.maximum(unclipped, clipped)
  if dual_clip is not None:
    per_token = jnp.where(advantages < 0, jnp.minimum(per_token, -dual_clip * advantages),
                          per_token)
  loss = masked_mean(per_token, mask)
  return loss, {
      "loss/policy_avg": loss,
      "policy/clipfrac_avg": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
      "policy/approxkl_avg": 0.5 * masked_mean(jnp.square(log_ratio), mask),
      "val/ratio": masked_mean(ratio, mask)}


def value_loss(values, old_values, returns, mask, cliprange_value: float):
  """(L_v, metrics): ½ masked mean of max((V − R̂)², (V_clip − R̂)²)."""
  clipped = jnp.clip(values, old_values - cliprange_value, old_values + cliprange_value)
  loss_unclipped, loss_clipped = jnp.square(values - returns), jnp.square(clipped - returns)
  loss = 0.5 * masked_mean(jnp.maximum(loss_unclipped, loss_clipped), mask)
  return loss, {
      "loss/value_avg": loss,
      "val/clipfrac_avg": masked_mean((loss_clipped > loss_unclipped).astype(jnp.float32), mask)}


def ppo_loss(cfg: PPOConfig, logps, values, batch, entropy=None, policy_weight=1.0):
  """(w · (L_pg − ent_coef · mean_m H) + vf_coef · L_v, metrics) of one microbatch: `batch`
  holds `old_logps`, `advantages`, `old_values`, `returns`, `loss_mask` [R, T]; `entropy` H
  [R, T] is logged (policy/entropy_avg) and, with ent_coef > 0, must carry its gradient
  (`token_stats(..., entropy_grad=True)`); `policy_weight` w (may be traced) is 0 while only the
  critic trains (a critic warm-up)."""
  mask = batch["loss_mask"]
  pg, metrics = policy_loss(logps, batch["old_logps"], batch["advantages"], mask, cfg.cliprange,
                            cfg.dual_clip)
  vf, value_metrics = value_loss(values, batch["old_values"], batch["returns"], mask,
                                 cfg.cliprange_value)
  metrics.update(value_metrics)
  if cfg.ent_coef and entropy is None:
    raise ValueError("config.ppo.ent_coef > 0 needs the policy's entropy")
  if entropy is not None:
    metrics["policy/entropy_avg"] = masked_mean(entropy, mask)
    pg = pg - cfg.ent_coef * metrics["policy/entropy_avg"]
  return policy_weight * pg + cfg.vf_coef * vf, metrics
