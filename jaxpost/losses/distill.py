"""Knowledge-distillation losses: soft-label KD, reverse KL and the generalised JSD of GKD.

Per position, with student logits z_S, teacher logits z_T and temperature τ,

    p_S = softmax(z_S / τ),   p_T = softmax(z_T / τ)                     (over the vocabulary)
    forward KL   KL(p_T ‖ p_S) = Σ_v p_T (log p_T − log p_S)   (Hinton et al. 2015, soft labels)
    reverse KL   KL(p_S ‖ p_T)                                  (mode seeking; MiniLLM, GKD)
    JSD_β        β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M),   M = β p_T + (1 − β) p_S
                 log M = logsumexp(log β + log p_T, log(1 − β) + log p_S)  (Agarwal et al. 2024)

JSD_β / β → forward KL as β → 0 and JSD_β / (1 − β) → reverse KL as β → 1; like TRL's
`generalized_jsd_loss`, β = 0 and β = 1 ARE those KLs exactly (not the vanishing JSD).

Hinton's τ² factor (the soft-target gradients scale as 1/τ², so τ² keeps their size when τ
changes) multiplies the divergence when `temperature_scale` is on; `generalized_jsd` (TRL's
convention) never applies it. `hard_weight` w mixes in the hard-label NLL of the data tokens
(at τ = 1): l_t = (1 − w) D_t + w (− log softmax(z_S)[x_t]). `top_k` > 0 truncates the teacher
to its k most likely tokens, renormalised (ties at the k-th logit are kept): cheaper targets
(sparse teacher logits) and no mass on the teacher's tail; KL(p_S ‖ p_T) is then infinite, so
it is refused with β = 1.

`generalized_jsd`, `forward_kl`, `reverse_kl` and `token_losses` work on dense logits [..., V]
(tests, users). Training uses `chunked_token_losses`: the same `token_losses` run position chunk
by position chunk through the chunked LM head of losses/logprobs.py, from the two models' final
hidden states, with the backward pass recomputing each chunk — neither model's fp32 [B, T, V]
logits exist at any time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from jaxpost.losses.logprobs import DEFAULT_CHUNK_SIZE, chunk_logits, chunked_head
from jaxpost.losses.sft import masked_mean

_TRUNCATED = -1e30  # log-space fill of tokens outside the teacher's top k (exp() is exactly 0)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """The loss settings (`config.distill.*`), checked once; see the module docstring."""
  beta: float = 0.0
  temperature: float = 1.0
  temperature_scale: bool = True
  hard_weight: float = 0.0
  top_k: int = 0

  def __post_init__(self):
    if not 0.0 <= self.beta <= 1.0:
      raise ValueError(f"config.distill.beta={self.beta} must be in [0, 1] (0: forward KL, "
                       "1: reverse KL)")
    if not self.temperature > 0:
      raise ValueError(f"config.distill.temperature={self.temperature} must be > 0")
    if not 0.0 <= self.hard_weight <= 1.0:
      raise ValueError(f"config.distill.hard_weight={self.hard_weight} must be in [0, 1]")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"config.distill.top_k={self.top_k!r} must be an int >= 0 (0: off)")
    if self.top_k and self.beta == 1.0:
      raise ValueError("config.distill.top_k > 0 with config.distill.beta=1: the reverse KL to a "
                       "truncated teacher is infinite; use beta < 1 or top_k = 0")


def log_softmax(logits, temperature: float = 1.0, top_k: int = 0):
  """log softmax(logits / τ) over the last axis, restricted to the `top_k` largest logits
  (renormalised; the others get a log-probability of -1e30, i.e. probability 0) when > 0."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, _TRUNCATED)
  return jax.nn.log_softmax(logits, axis=-1)


def _kl(logp, logq):
  """KL(p ‖ q) = Σ_v p (log p − log q) from log-probabilities, summed over the last axis."""
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def divergence(student_logp, teacher_logp, beta: float):
  """JSD_β of log-probabilities [..., V] -> [...]: forward KL at β = 0, reverse KL at β = 1."""
  if beta == 0.0:
    return _kl(teacher_logp, student_logp)
  if beta == 1.0:
    return _kl(student_logp, teacher_logp)
  mixture = jnp.logaddexp(math.log(beta) + teacher_logp, math.log1p(-beta) + student_logp)
  return beta * _kl(teacher_logp, mixture) + (1.0 - beta) * _kl(student_logp, mixture)


def generalized_jsd(student_logits, teacher_logits, beta: float, temperature: float = 1.0):
  """Per-token JSD_β of softmax(z / τ) for logits [B, T, V] -> [B, T] (summed over the
  vocabulary; no mask, no reduction, no τ² factor: TRL's `generalized_jsd_loss` terms)."""
  return divergence(log_softmax(student_logits, temperature),
                    log_softmax(teacher_logits, temperature), beta)


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0,
               temperature_scale: bool = True):
  """Per-token τ² KL(p_T ‖ p_S) (Hinton et al. 2015; without τ² when `temperature_scale` is
  off): [..., V] -> [...]."""
  scale = temperature ** 2 if temperature_scale else 1.0
  return scale * generalized_jsd(student_logits, teacher_logits, 0.0, temperature)


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0):
  """Per-token KL(p_S ‖ p_T): [..., V] -> [...]."""
  return generalized_jsd(student_logits, teacher_logits, 1.0, temperature)


def token_losses(cfg: DistillConfig, student_logits, teacher_logits, targets) -> dict:
  """Per-position terms of the training loss from logits [..., V] and data tokens [...]:
  `loss` = (1 − w) `divergence` + w `nll` (the divergence with its τ² factor when on, the NLL
  at τ = 1), and, without gradient, the student's argmax accuracy `correct` and `forward_kl` =
  KL(p_T ‖ p_S) at τ = 1 without truncation (what "held-out KL to the teacher" reports)."""
  student_logits = student_logits.astype(jnp.float32)
  teacher_logp = jax.lax.stop_gradient(log_softmax(teacher_logits, cfg.temperature, cfg.top_k))
  div = divergence(log_softmax(student_logits, cfg.temperature), teacher_logp, cfg.beta)
  if cfg.temperature_scale:
    div = div * cfg.temperature ** 2
  nll = -jnp.take_along_axis(jax.nn.log_softmax(student_logits, axis=-1), targets[..., None],
                             axis=-1)[..., 0]
  student_ng = jax.lax.stop_gradient(student_logits)
  correct = jnp.argmax(student_ng, axis=-1) == targets
  forward = _kl(jax.lax.stop_gradient(log_softmax(teacher_logits)), log_softmax(student_ng))
  return {"loss": (1.0 - cfg.hard_weight) * div + cfg.hard_weight * nll, "divergence": div,
          "nll": nll, "correct": correct.astype(jnp.float32), "forward_kl": forward}


def _chunk_losses(cfg: DistillConfig, h, kernel, ids, context, consts):
  """`token_losses` of one chunk of the chunked head: student logits h W, teacher logits from
  its own hidden states and kernel (frozen: no gradient)."""
  teacher = chunk_logits(context["teacher_hidden"], consts["teacher_kernel"])
  return token_losses(cfg, chunk_logits(h, kernel), jax.lax.stop_gradient(teacher), ids)


def chunked_token_losses(cfg: DistillConfig, hidden, kernel, teacher_hidden, teacher_kernel,
                         input_ids, mask=None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         groups: Optional[int] = None) -> dict:
  """`token_losses` [B, T] of the student (final hidden [B, T, D_S], output kernel [D_S, V])
  against the teacher (hidden [B, T, D_T], kernel [D_T, V]) predicting input_ids[:, t] from
  position t − 1: 0 at t = 0 and where `mask` == 0, computed only at masked-in chunks, never
  materialising [B, T, V] logits. Differentiable w.r.t. `hidden` and `kernel`."""
  if teacher_kernel.shape[-1] != kernel.shape[-1]:
    raise ValueError(f"student vocabulary {kernel.shape[-1]} != teacher vocabulary "
                     f"{teacher_kernel.shape[-1]}")
  return chunked_head(functools.partial(_chunk_losses, cfg), hidden, kernel, input_ids,
                      chunk_size, mask, groups,
                      context={"teacher_hidden": jax.lax.stop_gradient(teacher_hidden)},
                      consts={"teacher_kernel": jax.lax.stop_gradient(teacher_kernel)})


def masked_token_mean(losses: dict, mask) -> tuple:
  """(mean `loss` over the mask's tokens, metrics: the means of the other terms)."""
  mean = lambda v: masked_mean(v, mask)
  return mean(losses["loss"]), {"distill/divergence": mean(losses["divergence"]),
                                "distill/nll": mean(losses["nll"]),
                                "distill/forward_kl": mean(losses["forward_kl"]),
                                "mean_token_accuracy": mean(losses["correct"])}
