"""Group-relative policy optimisation (GRPO, Dr. GRPO, DAPO, BNPO, GSPO) and RLOO: the math.

Notation: a group is the G consecutive rows sampled from one prompt; r_i their scalar rewards,
valid unless None / non-finite (an invalid reward is excluded from every statistic and gets
advantage 0); m_t the completion mask [B, T] (1 up to and including EOS); log-probs are per token
[B, T] fp32 from the training forward at the sampling temperature; ρ_t = exp(log π_θ − log π_old).

Advantages (Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision):

    A_i = (r_i − mean_g r) / (s + 1e-4),   mean and unbiased std over the group's valid members

s = std_g (scale_rewards="group"); the std of all valid rewards of the batch, the centring staying
per group (="batch", as TRL 1.16); no division (="none", Liu et al. 2025, Dr. GRPO). A group with
equal rewards gets A = 0 (never NaN).

DAPO (Yu et al. 2025): dynamic sampling drops groups whose valid rewards are all equal (static
shapes: over-generate, then zero the dropped rows' masks with `dynamic_sampling_mask`); overlong
reward shaping (Eq. 13) with L = max_completion_length, C = overlong_buffer:

    R_len(|y|) = 0 for |y| <= L − C,   ((L − C) − |y|) / C for L − C < |y| <= L,   −1 beyond L

and `mask_truncated_completions` zeroes the mask of completions that ended without EOS.

Policy loss per token (the PPO clip of Schulman et al. 2017, as GRPO uses it):

    l_t = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) + β w_t k3_t

with k3 against the reference (`kl.py`) and w_t = ρ_t when `use_bias_correction_kl` (TRL 1.16's
default, after DeepSeek-V3.2; gradient through ρ; with a sequence ratio w_t = s_i, as TRL), else 1. importance_sampling_level="sequence"
(GSPO, Zheng et al. 2025): s_i = exp(Σ_t m_t log(π_θ/π_old) / Σ_t m_t), entering in GSPO-token form
ρ_t = sg[s_i] · π_θ(y_t) / sg[π_θ(y_t)]: value s_i at every token, gradient s_i ∇log π_θ(y_t), i.e.
GSPO's gradient for sequence advantages and the per-token one for [B, T] advantages.

`loss_type` normalises Σ_t m_t l_t:

    grpo      1/N_seq Σ_i (Σ_t m l / Σ_t m)            mean per sequence, then over sequences
    bnpo      Σ m l / Σ m                              token mean over the microbatch
    dapo      Σ m l / N_tok                            N_tok = completion tokens of the whole
                                                       accumulated batch (sum microbatch losses)
    dr_grpo   Σ m l / (N_seq · max_completion_length)  Liu et al. 2025

N_seq = the microbatch's rows (as TRL) unless `num_sequences` says otherwise. When π_old = π_θ
(the first update of an iteration) ρ ≡ 1: the loss is the normalised −A, its gradient −A ∇log π.

RLOO (Ahmadian et al. 2024): r_i = R_i − β Σ_t m_t k1_t(π_old ‖ π_ref) (no gradient),
A_i = r_i − mean_{j≠i, valid} r_j, ρ_i = exp(Σ_t m_t (log π_θ − log π_old)) (the sequence
likelihood ratio, summed as in TRL 1.16's RLOOTrainer, not GSPO's mean), loss = mean_i
−min(ρ_i A_i, clip(ρ_i) A_i).

Metrics (TRL's names): `clip_ratio/low_mean` = mean over completion tokens of
[ρ < 1 − ε_low and A < 0], `clip_ratio/high_mean` of [ρ > 1 + ε_high and A > 0],
`clip_ratio/region_mean` of either (means over sequences with a sequence ratio, over the rows with
completion tokens), `clip_ratio/low_min` / `clip_ratio/high_max` over the per-sequence means,
`kl` = token mean of w·k3, `entropy`; from advantages `reward`, `reward_std`,
`frac_reward_zero_std`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from jaxpost.losses.kl import k1, k3
from jaxpost.losses.logprobs import sequence_logprobs
from jaxpost.losses.sft import masked_mean

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
STD_EPS = 1e-4
ZERO_STD = 1e-8  # torch.isclose(std, 0)'s absolute tolerance, as TRL counts frac_reward_zero_std


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """GRPO-family hyper-parameters (names as TRL's GRPOConfig; the keys of `config.grpo`).
  `max_completion_length` (the rollout's max new tokens) defaults to the mask's width."""
  num_generations: int = 8
  loss_type: str = "dapo"
  scale_rewards: str = "group"
  epsilon: float = 0.2
  epsilon_high: Optional[float] = None  # None: = epsilon, set at construction (DAPO uses 0.28)
  beta: float = 0.0
  importance_sampling_level: str = "token"
  use_bias_correction_kl: bool = True
  mask_truncated_completions: bool = False
  dynamic_sampling: bool = False
  overlong_buffer: int = 0
  max_completion_length: Optional[int] = None

  def __post_init__(self):
    if self.epsilon_high is None:
      object.__setattr__(self, "epsilon_high", self.epsilon)
    choices = {"loss_type": LOSS_TYPES, "scale_rewards": SCALE_REWARDS,
               "importance_sampling_level": IMPORTANCE_SAMPLING_LEVELS}
    for key, allowed in choices.items():
      if getattr(self, key) not in allowed:
        raise ValueError(f"config.grpo.{key} must be one of {allowed}, got {getattr(self, key)!r}")
    if self.num_generations < 2:
      raise ValueError(f"config.grpo.num_generations must be >= 2, got {self.num_generations}")
    for key in ("epsilon", "epsilon_high"):
      value = getattr(self, key)
      if not 0 < value:
        raise ValueError(f"config.grpo.{key} must be > 0, got {value}")
    if self.epsilon >= 1:
      raise ValueError(f"config.grpo.epsilon must be < 1 (the lower clip is 1 - epsilon), "
                       f"got {self.epsilon}")
    if self.beta < 0:
      raise ValueError(f"config.grpo.beta must be >= 0, got {self.beta}")
    if self.overlong_buffer < 0:
      raise ValueError(f"config.grpo.overlong_buffer must be >= 0, got {self.overlong_buffer}")
    if self.max_completion_length is not None and self.max_completion_length < 1:
      raise ValueError(f"config.grpo.max_completion_length must be >= 1, "
                       f"got {self.max_completion_length}")
    if self.max_completion_length is not None and self.overlong_buffer > self.max_completion_length:
      raise ValueError(f"config.grpo.overlong_buffer={self.overlong_buffer} exceeds "
                       f"max_completion_length={self.max_completion_length}")

  @property
  def epsilon_low(self) -> float:
    return self.epsilon


@dataclasses.dataclass(frozen=True)
class RLOOConfig:
  """RLOO hyper-parameters (names and defaults as TRL 1.16's RLOOConfig; the keys of
  `config.rloo`): the k1 penalty β in the reward, the clip range of the sequence ratio, and
  TRL's optional batch normalisation of the advantages."""
  num_generations: int = 8
  beta: float = 0.05
  epsilon: float = 0.2
  epsilon_high: Optional[float] = None
  normalize_advantages: bool = False

  def __post_init__(self):
    if self.epsilon_high is None:
      object.__setattr__(self, "epsilon_high", self.epsilon)
    if self.num_generations < 2:
      raise ValueError(f"config.rloo.num_generations must be >= 2 (the baseline is the other "
                       f"samples' mean), got {self.num_generations}")
    if not 0 < self.epsilon < 1 or self.epsilon_high <= 0:
      raise ValueError(f"config.rloo.epsilon must be in (0, 1) and epsilon_high > 0, got "
                       f"{self.epsilon}, {self.epsilon_high}")
    if self.beta < 0:
      raise ValueError(f"config.rloo.beta must be >= 0, got {self.beta}")


# --- rewards -> advantages -------------------------------------------------------------------

def _grouped(rewards, num_generations: int, valid=None):
  """Rewards [B*G] or [B, G] -> (r [B, G] fp32 with invalid entries 0, validity [B, G])."""
  r = jnp.asarray(rewards, jnp.float32)
  if r.ndim not in (1, 2) or (r.ndim == 2 and r.shape[1] != num_generations) or (
      r.size % num_generations):
    raise ValueError(f"rewards of shape {r.shape} are not groups of num_generations="
                     f"{num_generations} (want [B * G] or [B, G])")
  r = r.reshape(-1, num_generations)
  ok = jnp.isfinite(r)
  if valid is not None:
    ok = ok & jnp.asarray(valid, bool).reshape(r.shape)
  return jnp.where(ok, r, 0.0), ok


def _masked_stats(r, ok):
  """Mean, unbiased std and count over the valid entries of each row of r [N, G]; std is 0 for a
  row with fewer than two valid entries (`count` tells)."""
  count = jnp.sum(ok, axis=1)
  mean = jnp.sum(jnp.where(ok, r, 0.0), axis=1) / jnp.maximum(count, 1)
  square = jnp.where(ok, jnp.square(r - mean[:, None]), 0.0)
  std = jnp.sqrt(jnp.sum(square, axis=1) / jnp.maximum(count - 1, 1))
  return mean, jnp.where(count >= 2, std, 0.0), count


def group_advantages(rewards, num_generations: int, valid=None, scale_rewards: str = "group"):
  """GRPO advantages (module docstring) -> (A with the rewards' shape, metrics).

  `valid` (optional, the rewards' shape): False for unscorable completions (None rewards);
  non-finite rewards are invalid too. Metrics: `reward` / `reward_std` (mean, unbiased std of the
  valid rewards), `frac_reward_zero_std` (fraction of completions whose scaling std is 0).
  """
  if scale_rewards not in SCALE_REWARDS:
    raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
  r, ok = _grouped(rewards, num_generations, valid)
  mean, std, count = _masked_stats(r, ok)
  batch_mean, batch_std, batch_count = _masked_stats(r.reshape(1, -1), ok.reshape(1, -1))
  if scale_rewards == "batch":
    std, count = jnp.broadcast_to(batch_std, mean.shape), jnp.broadcast_to(batch_count, mean.shape)
  advantages = r - mean[:, None]
  if scale_rewards != "none":
    advantages = advantages / (std[:, None] + STD_EPS)
  advantages = jnp.where(ok, advantages, 0.0)
  zero_std = ((count >= 2) & (std <= ZERO_STD)).astype(jnp.float32)
  metrics = {"reward": batch_mean[0], "reward_std": batch_std[0],
             "frac_reward_zero_std": jnp.mean(zero_std)}
  return advantages.reshape(jnp.shape(rewards)), jax.lax.stop_gradient(metrics)


def dynamic_sampling_mask(rewards, num_generations: int, valid=None):
  """DAPO dynamic sampling: True for the completions of groups whose valid rewards are not all
  equal (a group with fewer than two valid rewards is dropped too); the rewards' shape, bool."""
  r, ok = _grouped(rewards, num_generations, valid)
  highest = jnp.max(jnp.where(ok, r, -jnp.inf), axis=1, keepdims=True)
  lowest = jnp.min(jnp.where(ok, r, jnp.inf), axis=1, keepdims=True)
  return jnp.broadcast_to(highest > lowest, r.shape).reshape(jnp.shape(rewards))


def overlong_penalty(lengths, max_completion_length: int, overlong_buffer: int):
  """DAPO's soft overlong punishment R_len (module docstring) of completion lengths [B], fp32."""
  n = jnp.asarray(lengths, jnp.float32)
  over = jnp.where(n > max_completion_length, -1.0, 0.0)
  if overlong_buffer == 0:
    return over
  start = max_completion_length - overlong_buffer
  return jnp.where(n <= start, 0.0, jnp.where(n <= max_completion_length,
                                                (start - n) / overlong_buffer, over))


def rloo_rewards(rewards, old_logps, ref_logps, mask, beta):
  """RLOO's KL-penalised reward R_i − β Σ_t m_t k1(π_old ‖ π_ref), no gradient, [B]; and
  {"kl": token mean of k1}. Invalid (non-finite) rewards stay invalid."""
  kl = k1(old_logps, ref_logps)
  mask = jnp.asarray(mask, jnp.float32)
  penalised = jnp.asarray(rewards, jnp.float32) - beta * sequence_logprobs(kl, mask)
  return jax.lax.stop_gradient(penalised), jax.lax.stop_gradient({"kl": masked_mean(kl, mask)})


def rloo_advantages(rewards, num_generations: int, valid=None, normalize: bool = False):
  """RLOO leave-one-out advantages A_i = r_i − mean_{j≠i} r_j over the group's valid members,
  the rewards' shape. A completion that is invalid or the only valid one of its group gets 0.
  `normalize` (TRL's normalize_advantages): (A − mean A) / (std A + 1e-4) over the batch's
  completions that have an advantage."""
  r, ok = _grouped(rewards, num_generations, valid)
  count = jnp.sum(ok, axis=1, keepdims=True)
  baseline = (jnp.sum(r, axis=1, keepdims=True) - r) / jnp.maximum(count - 1, 1)
  usable = ok & (count >= 2)
  advantages = jnp.where(usable, r - baseline, 0.0)
  if normalize:
    mean, std, _ = _masked_stats(advantages.reshape(1, -1), usable.reshape(1, -1))
    advantages = jnp.where(usable, (advantages - mean[0]) / (std[0] + STD_EPS), 0.0)
  return advantages.reshape(jnp.shape(rewards))


# --- masks --------------------------------------------------------------------------------------

def completion_finished(completion_ids, mask, eos_ids):
  """[B] bool: the completion emitted one of `eos_ids` within its mask (else it was truncated)."""
  eos = jnp.isin(completion_ids, jnp.asarray(eos_ids))
  return jnp.any(eos & (jnp.asarray(mask) > 0), axis=-1)


def mask_truncated_completions(mask, finished):
  """The completion mask [B, T] with the rows of truncated completions (finished False) zeroed."""
  return mask * jnp.asarray(finished, mask.dtype)[:, None]


# --- policy losses ------------------------------------------------------------------------------

def clipped_surrogate(ratio, advantages, epsilon_low: float, epsilon_high: float):
  """−min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high) A) elementwise, and TRL's clip indicators:
  low = [ρ < 1 − ε_low and A < 0], high = [ρ > 1 + ε_high and A > 0]."""
  clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  loss = -jnp.minimum(ratio * advantages, clipped * advantages)
  low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
  high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
  return loss, low, high


def _log_importance_weights(logps, old_logps, mask, level: str):
  """(log ρ_t for the surrogate, log w_t for the KL correction), both [B, T]; module docstring."""
  log_ratio = logps - old_logps
  if level == "token":
    return log_ratio, log_ratio
  sequence = sequence_logprobs(log_ratio, mask, average=True)[:, None]
  gspo_token = jax.lax.stop_gradient(sequence) + logps - jax.lax.stop_gradient(logps)
  return gspo_token, jnp.broadcast_to(sequence, logps.shape)


def _normalised(loss_type: str, per_token, mask, num_items_in_batch, num_sequences,
                max_completion_length):
  """The loss_type's normaliser of Σ m l (module docstring)."""
  if loss_type == "grpo":
    return jnp.sum(sequence_logprobs(per_token, mask, average=True)) / num_sequences
  if loss_type == "bnpo":
    return masked_mean(per_token, mask)
  total = jnp.sum(per_token * mask)
  if loss_type == "dapo":
    count = jnp.sum(mask) if num_items_in_batch is None else num_items_in_batch
    return total / jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
  return total / (num_sequences * max_completion_length)  # dr_grpo


def _clip_metrics(low, high, mask, per_sequence: bool):
  """clip_ratio/* (TRL's names) from indicators broadcastable to mask [B, T]: means over the
  completion tokens, or (per_sequence) over the rows that have any, of each row's token mean."""
  has_tokens = jnp.sum(mask, axis=-1) > 0
  extreme = lambda fn, rows, fill: jnp.where(jnp.any(has_tokens),
                                             fn(jnp.where(has_tokens, rows, fill)), 0.0)
  out = {}
  for name, x in (("low", low), ("high", high), ("region", low | high)):
    x = jnp.broadcast_to(x, mask.shape).astype(jnp.float32)
    rows = sequence_logprobs(x, mask, average=True)
    out[f"clip_ratio/{name}_mean"] = (masked_mean(rows, has_tokens) if per_sequence
                                      else masked_mean(x, mask))
    if name == "low":
      out["clip_ratio/low_min"] = extreme(jnp.min, rows, jnp.inf)
    elif name == "high":
      out["clip_ratio/high_max"] = extreme(jnp.max, rows, -jnp.inf)
  return out


def grpo_loss(cfg: GRPOConfig, logps, advantages, mask, old_logps=None, ref_logps=None,
              entropy=None, num_items_in_batch=None, num_sequences=None):
  """GRPO-family loss of one microbatch (module docstring) -> (scalar loss, metrics).

  logps [B, T]: the policy's (differentiable); old_logps [B, T]: the sampling policy's (None: a
  stop-gradient copy of logps, ρ ≡ 1); ref_logps [B, T]: the reference's (needed when beta > 0);
  advantages [B] or [B, T]; mask [B, T] completion mask; entropy [B, T] (optional, for the
  `entropy` metric). num_items_in_batch: dapo's completion-token count of the whole accumulated
  batch (default: this microbatch's). num_sequences: the sequence count of grpo / dr_grpo
  (default: B rows).
  """
  logps = jnp.asarray(logps, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  if logps.shape != mask.shape:
    raise ValueError(f"logps {logps.shape} and mask {mask.shape} must have the same shape [B, T]")
  old = jax.lax.stop_gradient(logps) if old_logps is None else jnp.asarray(old_logps, jnp.float32)
  adv = jnp.asarray(advantages, jnp.float32)
  adv = adv[:, None] if adv.ndim == 1 else adv
  sequence_level = cfg.importance_sampling_level == "sequence"  # then clip metrics count rows
  log_ratio, log_kl_weight = _log_importance_weights(logps, old, mask,
                                                     cfg.importance_sampling_level)
  per_token, low, high = clipped_surrogate(jnp.exp(log_ratio), adv, cfg.epsilon_low,
                                           cfg.epsilon_high)
  metrics = _clip_metrics(low, high, mask, per_sequence=sequence_level)
  if cfg.beta > 0:
    if ref_logps is None:
      raise ValueError(f"config.grpo.beta={cfg.beta} needs reference log-probs (ref_logps)")
    kl = k3(logps, ref_logps)
    if cfg.use_bias_correction_kl:
      kl = kl * jnp.exp(log_kl_weight)
    per_token = per_token + cfg.beta * kl
    metrics["kl"] = masked_mean(kl, mask)
  if entropy is not None:
    metrics["entropy"] = masked_mean(jnp.asarray(entropy, jnp.float32), mask)
  rows = mask.shape[0] if num_sequences is None else num_sequences
  length = mask.shape[1] if cfg.max_completion_length is None else cfg.max_completion_length
  loss = _normalised(cfg.loss_type, per_token, mask, num_items_in_batch, rows, length)
  return loss, jax.lax.stop_gradient(metrics)


def rloo_loss(logps, old_logps, advantages, mask, epsilon: float = 0.2,
              epsilon_high: Optional[float] = None, entropy=None):
  """RLOO's clipped sequence-level loss (module docstring) -> (scalar loss, metrics).
  logps / old_logps [B, T] per token (summed over the mask here), advantages [B]."""
  mask = jnp.asarray(mask, jnp.float32)
  log_ratio = sequence_logprobs(jnp.asarray(logps, jnp.float32) - old_logps, mask)
  eps_high = epsilon if epsilon_high is None else epsilon_high
  per_sequence, low, high = clipped_surrogate(jnp.exp(log_ratio),
                                              jnp.asarray(advantages, jnp.float32), epsilon,
                                              eps_high)
  metrics = _clip_metrics(low[:, None], high[:, None], mask, per_sequence=True)
  if entropy is not None:
    metrics["entropy"] = masked_mean(jnp.asarray(entropy, jnp.float32), mask)
  return jnp.mean(per_sequence), jax.lax.stop_gradient(metrics)
