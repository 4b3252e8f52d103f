"""Optimiser from `config.optimizer`: clip -> {AdamW, Adafactor, SGD} with a warmup schedule.

    lr(s) = lr * s / W                                      for s < W   (linear warmup)
          = lr * (r + (1 - r) * decay((s - W) / (S - W)))    after       (S = max_steps)

with decay = (1 + cos(pi x)) / 2 ("cosine"), 1 - x ("linear") or 1 ("constant"), and r =
`min_lr_ratio`. Weight decay (decoupled, Loshchilov & Hutter 2019) skips norm scales and biases
and, unless `decay_embeddings`, the token embeddings. Gradients are clipped to global norm
`max_grad_norm` (0 disables) before the update. `check_optimizer_config` states the valid
ranges; `build_optimizer` applies it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


# key -> (lowest, highest, whether the highest is allowed); every bound is inclusive but that one.
RANGES = {"learning_rate": (0.0, math.inf, False), "warmup_steps": (0, math.inf, False),
          "warmup_ratio": (0.0, 1.0, False), "min_lr_ratio": (0.0, 1.0, True),
          "weight_decay": (0.0, math.inf, False), "max_grad_norm": (0.0, math.inf, False),
          "b1": (0.0, 1.0, False), "b2": (0.0, 1.0, False), "eps": (0.0, math.inf, False),
          "momentum": (0.0, 1.0, False)}


def check_optimizer_config(opt_cfg):
  """Raises naming the key: unknown name or schedule, a value outside RANGES (a learning rate
  must be > 0: 0 does not train and < 0 climbs the loss)."""
  if opt_cfg.name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name={opt_cfg.name!r}; choose one of {OPTIMIZERS}")
  if opt_cfg.schedule not in SCHEDULES:
    raise ValueError(f"config.optimizer.schedule={opt_cfg.schedule!r}; choose one of "
                     f"{SCHEDULES}")
  if not opt_cfg.learning_rate > 0:
    raise ValueError(f"config.optimizer.learning_rate={opt_cfg.learning_rate} must be > 0")
  for key, (low, high, high_ok) in RANGES.items():
    value = opt_cfg.get(key, low)
    if not (low <= value < high or (high_ok and value == high)):
      interval = f"[{low}, {high}{']' if high_ok else ')'}"
      raise ValueError(f"config.optimizer.{key}={value} is outside {interval}")


def learning_rate_schedule(opt_cfg, max_steps: int) -> optax.Schedule:
  lr, ratio = opt_cfg.learning_rate, opt_cfg.min_lr_ratio
  warmup = opt_cfg.warmup_steps or int(round(opt_cfg.warmup_ratio * max_steps))
  decay_steps = max(max_steps - warmup, 1)
  kind = opt_cfg.schedule

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    x = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    decay = {"cosine": 0.5 * (1 + jnp.cos(jnp.pi * x)), "linear": 1 - x,
             "constant": jnp.ones_like(x)}[kind]
    warm = jnp.minimum(step / warmup, 1.0) if warmup > 0 else 1.0
    return lr * warm * (ratio + (1 - ratio) * decay)

  return schedule


def decay_mask(params, decay_embeddings: bool = True):
  """True for leaves that get weight decay: everything but norm scales, biases (and
  embeddings when `decay_embeddings` is False)."""
  excluded = {"scale", "bias"} | (set() if decay_embeddings else {"embedding"})

  def keep(path, _):
    return getattr(path[-1], "key", None) not in excluded

  return jax.tree_util.tree_map_with_path(keep, params)


def build_optimizer(opt_cfg, max_steps: int):
  """(optax transformation, schedule) for `config.optimizer`."""
  check_optimizer_config(opt_cfg)
  schedule = learning_rate_schedule(opt_cfg, max_steps)
  mask = lambda p: decay_mask(p, opt_cfg.decay_embeddings)
  name = opt_cfg.name
  if name == "adamw":
    core = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                       weight_decay=opt_cfg.weight_decay, mask=mask)
  elif name == "adafactor":
    core = optax.adafactor(schedule, weight_decay_rate=opt_cfg.weight_decay or None,
                           weight_decay_mask=mask)
  else:  # "sgd"
    core = optax.chain(optax.add_decayed_weights(opt_cfg.weight_decay, mask),
                       optax.sgd(schedule, momentum=opt_cfg.momentum or None))
  if opt_cfg.max_grad_norm > 0:
    core = optax.chain(optax.clip_by_global_norm(opt_cfg.max_grad_norm), core)
  return core, schedule


def member_optimizer(transforms: dict):
  """One optax transformation over a {member: tree} parameter dict, member k updated by
  `transforms[k]` (its own learning rate, clipping and state): `optax.multi_transform`."""
  def labels(params):
    return {name: jax.tree.map(lambda _, n=name: n, tree) for name, tree in params.items()}
  return optax.multi_transform(transforms, labels)
