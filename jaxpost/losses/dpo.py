"""Direct preference losses on per-sequence log-probs: DPO and its family.

Inputs are per-sequence arrays [B]: `π` = policy and `ref` = reference log-probs summed over the
completion tokens of the chosen (c) and rejected (r) responses, and `n` = completion lengths
(tokens, clamped at 1). Averaged log-probs are `avg π = π / n`. With

    Δ = (π_c - ref_c) - (π_r - ref_r),    ρ = β Δ,    ε = label_smoothing,

the per-pair losses (the total is their mean over the batch) are

  sigmoid  -(1-ε) log σ(ρ) - ε log σ(-ρ)               DPO, Rafailov et al. 2023; ε > 0 is
                                                       conservative DPO (cDPO), Mitchell 2023
  hinge    max(0, 1 - ρ)                               SLiC / RSO hinge on the DPO margin
  robust   (-(1-ε) log σ(ρ) + ε log σ(-ρ)) / (1 - 2ε)  unbiased under label flips with prob. ε,
                                                       Chowdhury et al. 2024
  ipo      (h - 1/(2β))²,  h = (π_c - ref_c)/n_c - (π_r - ref_r)/n_r
                                                       IPO, Azar et al. 2023 (Eq. 17; β is τ),
                                                       length-averaged as TRL does
  simpo    -(1-ε) log σ(s) - ε log σ(-s),  s = β(avg π_c - avg π_r) - γ
                                                       SimPO, Meng et al. 2024 (no reference)
  orpo     NLL_c - β log σ(log odds_c - log odds_r),  log odds = avg π - log(1 - exp(avg π))
                                                       ORPO, Hong et al. 2024 (no reference;
                                                       β is λ; the NLL term is part of ORPO)
  kto      see `kto_loss` (unpaired data)

`sft_weight` α adds α · NLL_c to any of them (RPO, Pang et al. 2024), where
NLL_c = -Σ π_c / Σ n_c is the per-token NLL of the chosen completions over the whole batch.

These match TRL 1.16 (DPOTrainer; CPOTrainer for simpo; ORPOTrainer; KTOTrainer), except that TRL
1.16's sigmoid ignores label_smoothing (cDPO there is older TRL's and CPOTrainer's behaviour).

Metrics use TRL's names: `rewards/chosen` = mean β(π_c - ref_c) (for simpo and orpo, which have no
reference: β avg π_c), `rewards/rejected`, `rewards/accuracies` = mean[reward_c > reward_r]
where a difference within float32 rounding of the log-probs (TIE_TOLERANCE relative) is a tie
(XLA rounds the differentiated policy forward and the reference forward differently, and
policy = reference must score 0 as in TRL), `rewards/margins`, `logps/chosen`, `logps/rejected`
(means of the summed log-probs), and when the
logit sums are given `logits/chosen`, `logits/rejected`: the mean over all completion tokens of the
batch of the mean logit over the vocabulary. Their input is the per-row sum over completion tokens
of that mean logit: `sequence_logprobs(token_stats(...)["logit_mean"], loss_mask)`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpost.losses.sft import masked_mean

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")
SMOOTHED = ("sigmoid", "robust", "simpo")  # the losses that use label_smoothing
TIE_TOLERANCE = 1e-5  # relative to the log-prob magnitudes; see rewards/accuracies above


@dataclasses.dataclass(frozen=True)
class PreferenceLossConfig:
  """Hyper-parameters of the DPO family; field names are the config keys (`config.<name>`)."""
  loss_type: str = "sigmoid"
  beta: float = 0.1
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5
  sft_weight: float = 0.0
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0

  def __post_init__(self):
    if self.loss_type not in LOSS_TYPES:
      raise ValueError(f"config.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
    if not self.beta > 0:
      raise ValueError(f"config.beta must be > 0, got {self.beta}")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f"config.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
    if self.label_smoothing and self.loss_type not in SMOOTHED:
      raise ValueError(f"config.label_smoothing={self.label_smoothing} has no effect with "
                       f"loss_type={self.loss_type!r}; it applies to {SMOOTHED} only")
    if self.sft_weight < 0:
      raise ValueError(f"config.sft_weight must be >= 0, got {self.sft_weight}")
    for key in ("desirable_weight", "undesirable_weight"):
      if not getattr(self, key) > 0:
        raise ValueError(f"config.{key} must be > 0, got {getattr(self, key)}")

  @classmethod
  def from_config(cls, config) -> "PreferenceLossConfig":
    """Reads the fields that `config` (a ConfigDict or mapping) has; others keep their defaults."""
    get = config.get if hasattr(config, "get") else lambda k, d: getattr(config, k, d)
    return cls(**{f.name: get(f.name, f.default) for f in dataclasses.fields(cls)})

  @property
  def needs_reference(self) -> bool:
    return self.loss_type not in REFERENCE_FREE

  @property
  def paired(self) -> bool:
    """True for chosen/rejected batches; False for KTO's unpaired (completion, label) batches."""
    return self.loss_type != "kto"


def _smoothed_sigmoid(z, eps):
  return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def _log1mexp(x):
  """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
  return jnp.where(x < -jnp.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def _nll(logps, lengths):
  """Per-token NLL over all rows: -Σ logps / Σ lengths."""
  return -jnp.sum(logps) / jnp.maximum(jnp.sum(lengths), 1.0)


def _pair_losses(cfg, pc, pr, nc, nr, rc, rr):
  """Per-pair losses [B], implied rewards (chosen, rejected) [B] and extra metrics."""
  beta, eps = cfg.beta, cfg.label_smoothing
  if cfg.loss_type in REFERENCE_FREE:
    ac, ar = pc / nc, pr / nr
    if cfg.loss_type == "simpo":
      return _smoothed_sigmoid(beta * (ac - ar) - cfg.simpo_gamma, eps), beta * ac, beta * ar, {}
    # ORPO: clamp so that a completion of probability 1 keeps finite odds and gradients.
    ac_, ar_ = jnp.minimum(ac, -1e-6), jnp.minimum(ar, -1e-6)
    log_odds = (ac_ - ar_) - (_log1mexp(ac_) - _log1mexp(ar_))
    ratio = jax.nn.log_sigmoid(log_odds)
    extra = {"log_odds_ratio": jnp.mean(ratio), "log_odds_chosen": jnp.mean(log_odds)}
    return -beta * ratio, beta * ac, beta * ar, extra
  lc, lr = pc - rc, pr - rr
  rho = beta * (lc - lr)
  if cfg.loss_type == "sigmoid":
    losses = _smoothed_sigmoid(rho, eps)
  elif cfg.loss_type == "hinge":
    losses = jax.nn.relu(1.0 - rho)
  elif cfg.loss_type == "robust":
    losses = (-(1 - eps) * jax.nn.log_sigmoid(rho) + eps * jax.nn.log_sigmoid(-rho)) / (1 - 2 * eps)
  else:  # ipo
    losses = (lc / nc - lr / nr - 1.0 / (2.0 * beta)) ** 2
  return losses, beta * lc, beta * lr, {}


def _check_reference(cfg, *refs):
  if cfg.needs_reference and any(r is None for r in refs):
    raise ValueError(
        f"config.loss_type={cfg.loss_type!r} needs reference log-probs but none were given: set "
        f"config.ref.name_or_path (default: the initial policy) or config.precompute_ref, or use "
        f"a reference-free loss_type {REFERENCE_FREE}")


def _accuracy(beta, rew_c, rew_r, logps):
  """mean[reward_c > reward_r], with differences within float rounding of the `logps` that the
  rewards are made of counted as ties."""
  scale = sum(jnp.abs(x) for x in logps) + 1.0
  return jnp.mean((rew_c - rew_r > beta * TIE_TOLERANCE * scale).astype(jnp.float32))


def _logits_metrics(sums, lengths, names):
  return {name: jnp.sum(s) / jnp.maximum(jnp.sum(n), 1.0)
          for name, s, n in zip(names, sums, lengths) if s is not None}


def preference_loss(cfg: PreferenceLossConfig, policy_chosen_logps, policy_rejected_logps,
                    chosen_lengths, rejected_lengths, ref_chosen_logps=None,
                    ref_rejected_logps=None, chosen_logits_sum=None, rejected_logits_sum=None):
  """Pairwise DPO-family loss (module docstring) -> (scalar loss, metrics dict of scalars).

  All inputs are [B] arrays; the `ref_*` pair is required unless loss_type is reference-free, and
  the `*_logits_sum` pair (per-row sums of the vocabulary-mean logit over completion tokens) only
  feeds the `logits/*` metrics.
  """
  if not cfg.paired:
    raise ValueError("config.loss_type='kto' takes unpaired batches: use kto_loss")
  _check_reference(cfg, ref_chosen_logps, ref_rejected_logps)
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  pc, pr, rc, rr = map(f32, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps))
  nc, nr = (jnp.maximum(f32(n), 1.0) for n in (chosen_lengths, rejected_lengths))
  losses, rew_c, rew_r, extra = _pair_losses(cfg, pc, pr, nc, nr, rc, rr)
  loss = jnp.mean(losses)
  nll_weight = float(cfg.loss_type == "orpo") + cfg.sft_weight
  if nll_weight:
    extra["nll_loss"] = _nll(pc, nc)
    loss = loss + nll_weight * extra["nll_loss"]
  rew_c, rew_r = jax.lax.stop_gradient(rew_c), jax.lax.stop_gradient(rew_r)
  reward_logps = (pc, pr, rc, rr) if cfg.needs_reference else (pc / nc, pr / nr)
  metrics = {
      "rewards/chosen": jnp.mean(rew_c),
      "rewards/rejected": jnp.mean(rew_r),
      "rewards/accuracies": _accuracy(cfg.beta, rew_c, rew_r, reward_logps),
      "rewards/margins": jnp.mean(rew_c - rew_r),
      "logps/chosen": jnp.mean(pc),
      "logps/rejected": jnp.mean(pr),
      **_logits_metrics((chosen_logits_sum, rejected_logits_sum), (nc, nr),
                        ("logits/chosen", "logits/rejected")),
      **extra,
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def kto_loss(cfg: PreferenceLossConfig, policy_logps, lengths, labels, ref_logps=None,
             policy_kl_logps=None, ref_kl_logps=None, logits_sum=None):
  """KTO (Ethayarajh et al. 2024, Eq. 7, as TRL implements it) -> (scalar loss, metrics).

  With log-ratio l = π - ref on each (prompt, completion) row and the KL estimate

      z = max(0, mean(π_KL - ref_KL)),  no gradient,

  where π_KL / ref_KL are summed log-probs of *mismatched* pairs (each prompt with another row's
  completion), the per-row loss is

      desirable (label 1):    λ_D (1 - σ(β (l - z)))
      undesirable (label 0):  λ_U (1 - σ(β (z - l)))

  and the total is their mean over all rows (+ `sft_weight` · per-token NLL of the desirable rows).
  Without the `*_kl_logps` inputs z = 0. Metrics: `kl`, `rewards/chosen` / `rewards/rejected`
  (mean β l over desirable / undesirable rows; 0 when a side is absent), `rewards/margins`,
  `logps/*`, `logits/*`.
  """
  if cfg.loss_type != "kto":
    raise ValueError(f"unpaired (KTO) rows need config.loss_type='kto', got {cfg.loss_type!r}")
  _check_reference(cfg, ref_logps)
  if (policy_kl_logps is None) != (ref_kl_logps is None):
    raise ValueError("kto_loss: give both policy_kl_logps and ref_kl_logps, or neither")
  pi, ref = jnp.asarray(policy_logps, jnp.float32), jnp.asarray(ref_logps, jnp.float32)
  n = jnp.maximum(jnp.asarray(lengths, jnp.float32), 1.0)
  good = (jnp.asarray(labels) > 0.5).astype(jnp.float32)
  kl = jnp.zeros((), jnp.float32)
  if policy_kl_logps is not None:
    kl = jnp.maximum(jnp.mean(jnp.asarray(policy_kl_logps, jnp.float32) - ref_kl_logps), 0.0)
    kl = jax.lax.stop_gradient(kl)
  ratio = pi - ref
  losses = jnp.where(good > 0, cfg.desirable_weight * (1 - jax.nn.sigmoid(cfg.beta * (ratio - kl))),
                     cfg.undesirable_weight * (1 - jax.nn.sigmoid(cfg.beta * (kl - ratio))))
  loss = jnp.mean(losses)
  extra = {}
  if cfg.sft_weight:
    extra["nll_loss"] = _nll(pi * good, n * good)
    loss = loss + cfg.sft_weight * extra["nll_loss"]
  rewards = jax.lax.stop_gradient(cfg.beta * ratio)
  metrics = {
      "kl": kl,
      "rewards/chosen": masked_mean(rewards, good),
      "rewards/rejected": masked_mean(rewards, 1 - good),
      "logps/chosen": masked_mean(pi, good),
      "logps/rejected": masked_mean(pi, 1 - good),
      **extra,
  }
  metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
  if logits_sum is not None:
    sums, counts = (logits_sum * good, logits_sum * (1 - good)), (n * good, n * (1 - good))
    metrics.update(_logits_metrics(sums, counts, ("logits/chosen", "logits/rejected")))
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
