"""The algorithm registry: how SFT, reward modelling, DPO, PPO, ... plug into the one loop.

An algorithm is an `Algorithm` record registered under the name that `config.algorithm` selects:

    register(Algorithm(
        name="dpo",
        loss_fn=dpo_loss,                # pure: (params, frozen, batch, rng, ctx) -> (loss, metrics)
        loader_kind="preference",        # build_loader kind: "sft" | "preference" | "unpaired" | "prompt"
        head="lm",                       # trainable model head: "lm" or "score"
        weight_fn=examples,              # weight of a microbatch in the accumulated mean
        prepare_frozen=reference_model,  # optional: builds the frozen trees (e.g. the reference)
        collect=None,                    # optional: host-side batch transform before the step
        make_step=None,                  # optional: the whole loop step (rollout algorithms)
        finalize_metrics=None,           # optional: derived metrics from the averaged ones
        check_config=check_dpo_keys,     # optional: raises on a bad value of its own keys
        evals=("loss", "task"),          # default evaluators (jaxpost/train/evals.py)
    ))

Contract, in the order the loop uses it:

* `check_config(config)` (optional) runs before anything is loaded (jaxpost/train/validate.py)
  and raises a ValueError naming the key when one of the algorithm's own keys is invalid —
  parse them with the same code the loss uses, so the valid values live in one place.
* `prepare_config(config) -> config` (optional) runs after the checks, before anything is
  loaded, and returns the config the run uses (and saves in its checkpoints): distill builds a
  student from the teacher's layers and points `model.name_or_path` at it. It must be
  idempotent (a resumed run calls it again).
* `prepare_frozen(ctx: SetupContext) -> (frozen, modules)`: `frozen` is a dict of parameter trees
  that are inputs to the step but never optimised (no optimiser state, no gradient); `modules`
  maps the same names to the Flax modules that apply them. `ctx.policy` is the loaded policy
  (its params are DONATED to the train state: copy them, e.g. `jax.tree.map(jnp.copy, ...)`,
  to reuse them as a reference — except with `ctx.lora`, where they are the frozen base and
  are used as they are); `ctx.load(name_or_path=..., head=...)` (keywords) loads another model
  sharded on the training mesh. Frozen trees are checkpointed only through their config.
* `loss_fn(params, frozen, batch, rng, ctx: LossContext) -> (loss, metrics)` is traced inside the
  jitted step. `batch` is ONE microbatch (see DESIGN "Batches"); `loss` a scalar mean over it;
  `metrics` a flat dict of scalars (TRL names). `ctx.model` applies `params`; `ctx.modules[k]`
  applies `frozen[k]`; `ctx.config` is the run config; `ctx.training` is False in eval (no noise).
  `rng` is a fresh key per step and microbatch. The step differentiates w.r.t. `params` only.
  With LoRA the step hands the loss the applied tree (frozen base + adapters) as `params`, so
  losses never see the difference.
* `weight_fn(microbatch) -> scalar`: the step returns sum_i w_i loss_i / sum_i w_i over the
  microbatches (and weights metrics the same way), so gradient accumulation is exact when
  `loss_i` is a mean over `w_i` units (tokens for SFT, pairs for DPO). Default: number of rows.
* `collect(batch, frozen, ctx: LossContext) -> batch` (optional) runs on the host between the
  loader and the step (e.g. adds cached reference log-probs); it never sees the train state,
  which the step donates.
* `make_step(setup: StepSetup) -> step(state, frozen, batch) -> (state, metrics)` (optional)
  supplies the whole loop step. Default (`jaxpost/train/step.py` `train_step`): one jitted
  optimiser update with the state donated. Rollout algorithms make one step one ITERATION
  (sample -> reward -> advantages -> `scan_updates` over epochs x minibatches), so checkpoints,
  SIGTERM and evals fall on iteration boundaries; such a step may run Python between jitted
  parts and add host scalars (timings) to its metrics. `metrics` must hold the keys
  `gradient_step` returns (loss, grad/update/param norms, learning_rate, tokens, finite); a
  `flops` entry, when present, replaces the loop's estimate from the loader batch (for MFU).
* `updates_per_step(config) -> int` (optional, default 1): optimiser updates per loop step; the
  LR schedule's horizon is max_steps x this, since `TrainState.step` counts updates.
* `init_extra(config) -> dict of arrays` (optional, default {}): initial `TrainState.extra`,
  algorithm state that is checkpointed and restored with the train state.
* `finalize_metrics(metrics) -> metrics` (optional) derives metrics from averaged ones (SFT adds
  perplexity = exp(loss)).
* `members(ctx: SetupContext) -> {name: Member}` (optional): trainable models besides the
  policy (PPO's critic "value"). `state.params` becomes {"policy": ..., name: ...}, optimised by
  one `optax.multi_transform` (each member its own optimiser section: learning rate, clipping),
  the member's module is `ctx.modules[name]`, and the step logs `grad_norm/<name>`. Without it
  the trainable tree stays the policy's bare tree. With LoRA only the policy has adapters.

`get(name)` raises naming the registered algorithms. "sft" registers at the bottom of this file,
the other built-ins in the modules of `BUILTIN_MODULES` (imported on the first unknown name; the
loss math stays in `jaxpost/losses/<algo>.py`); user code may `register` its own before calling
`jaxpost.train(config)`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from jaxpost.losses import sft
from jaxpost.models import lora

LOADER_KINDS = ("sft", "preference", "unpaired", "prompt")
# Modules registering the other built-in algorithms ("dpo", "kto", "rm", "grpo", "rloo", "ppo",
# "distill", "gkd"),
# imported on demand.
BUILTIN_MODULES = ("jaxpost.algos.preference", "jaxpost.algos.grpo", "jaxpost.algos.ppo",
                   "jaxpost.algos.distill")


@dataclasses.dataclass(frozen=True)
class LossContext:
  """Static (non-array) inputs of a loss: closed over, never traced."""
  model: Any
  config: Any
  training: bool = True
  modules: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SetupContext:
  """What `prepare_frozen` receives: the run config, the loaded policy, a loader of other
  models and the run's train loader (its tokenised table and stream, e.g. to precompute over).
  With `lora`, `policy.params` are the frozen base weights (not donated; the adapters train)."""
  config: Any
  policy: Any
  load: Callable[..., Any]
  lora: bool = False
  train_loader: Any = None

  def reference(self, name_or_path: str = ""):
    """(params, module) of a frozen reference policy: checkpoint `name_or_path`, or "" the
    initial policy: a copy of its weights, or with LoRA the frozen base itself (the model with
    adapters off; no second copy)."""
    if name_or_path:
      ref = self.load(name_or_path=name_or_path, head="lm")
      return ref.params, ref.model
    params = self.policy.params
    return (params if self.lora else jax.tree.map(jnp.copy, params)), self.policy.model


# frozen[LORA_BASE] holds the frozen base weights of a LoRA run; the trainable `params` are the
# adapters (+ any module trained in full) and the model applies their union (`applied_params`).
LORA_BASE = "lora_base"
# With `Algorithm.members` the trainable tree is {POLICY: policy tree, <member>: its tree, ...}
# (PPO: {"policy", "value"}); without, it is the policy's bare tree (wave-1 checkpoints load).
POLICY = "policy"


@dataclasses.dataclass(frozen=True)
class Member:
  """A trainable model besides the policy (the PPO critic): its parameters (donated to the train
  state), the module applying them (None when the algorithm applies them itself, e.g. a head on
  the policy's trunk), and its optimiser section (keys of `config.optimizer`)."""
  params: Any
  module: Any
  optimizer: Any


def is_members(params) -> bool:
  """Whether a trainable tree is the {POLICY: ..., <member>: ...} tree of several members."""
  return isinstance(params, Mapping) and POLICY in params


def policy_params(params):
  """The policy's part of a trainable (or applied) tree."""
  return params[POLICY] if is_members(params) else params


def applied_params(params, frozen):
  """The tree the models apply: `params`, or with LoRA base + adapters (of the policy member
  when there are several members)."""
  if LORA_BASE not in frozen:
    return params
  if is_members(params):
    return {**params, POLICY: lora.combine(frozen[LORA_BASE], params[POLICY])}
  return lora.combine(frozen[LORA_BASE], params)


def applied_policy(params, frozen):
  """The tree the policy model applies (evaluators, sampling, export)."""
  return policy_params(applied_params(params, frozen))


def examples(batch) -> Any:
  """Default microbatch weight: its number of rows."""
  leaf = next(iter(batch.values()))
  return jnp.asarray(leaf.shape[0], jnp.float32)


def no_frozen(ctx: SetupContext):
  del ctx
  return {}, {}


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """What `make_step` receives: the run config and algorithm, the loss context, the optimiser
  and its schedule (in updates), the mesh and the shardings of the state, frozen trees and
  batches, the policy (`LoadedModel` without params: module, tokenizer, model config; the params
  are `state.params`, with LoRA applied through `applied_params`) and the train loader (e.g.
  `loader.example(row)` for the prompt rows behind a prompt batch)."""
  config: Any
  algorithm: "Algorithm"
  ctx: LossContext
  tx: Any
  schedule: Callable
  mesh: Any
  state_shardings: Any
  frozen_shardings: Any
  batch_sharding: Any
  policy: Any
  loader: Any = None


def one_update(config) -> int:
  del config
  return 1


def no_extra(config) -> dict:
  del config
  return {}


@dataclasses.dataclass(frozen=True)
class Algorithm:
  name: str
  loss_fn: Callable
  loader_kind: str = "sft"
  head: str = "lm"
  weight_fn: Callable = examples
  prepare_frozen: Callable = no_frozen
  collect: Optional[Callable[..., dict]] = None
  make_step: Optional[Callable[[StepSetup], Callable]] = None
  updates_per_step: Callable[[Any], int] = one_update
  init_extra: Callable[[Any], dict] = no_extra
  finalize_metrics: Optional[Callable[[dict], dict]] = None
  members: Optional[Callable[[SetupContext], dict]] = None
  check_config: Optional[Callable[[Any], None]] = None
  prepare_config: Optional[Callable[[Any], Any]] = None
  evals: tuple = ("loss", "task")

  def __post_init__(self):
    if self.loader_kind not in LOADER_KINDS:
      raise ValueError(f"Algorithm {self.name!r}: loader_kind {self.loader_kind!r} is not one of "
                       f"{LOADER_KINDS}")


_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
  _REGISTRY[algorithm.name] = algorithm
  return algorithm


def get(name: str) -> Algorithm:
  if name not in _REGISTRY:
    for module in BUILTIN_MODULES:
      importlib.import_module(module)
  if name not in _REGISTRY:
    raise ValueError(f"config.algorithm={name!r} is not a registered algorithm; "
                     f"known: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def _with_perplexity(metrics: dict) -> dict:
  return {**metrics, "perplexity": math.exp(min(metrics["loss"], 80.0))}


def _check_sft_keys(config):
  if config.get("neftune_alpha", 0.0) < 0:
    raise ValueError(f"config.neftune_alpha={config.neftune_alpha} must be >= 0 (0 disables it)")


register(Algorithm(name="sft", loss_fn=sft.sft_loss, loader_kind="sft",
                   weight_fn=sft.num_targets, finalize_metrics=_with_perplexity,
                   check_config=_check_sft_keys))
