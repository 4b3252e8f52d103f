"""GRPO (and Dr. GRPO, DAPO, BNPO, GSPO) and RLOO as rollout algorithms of the one loop.

The math is in `jaxpost/losses/grpo.py` and `losses/kl.py`; this file is the glue. One loop step
is one iteration on a batch of B prompts (`config.batch_size` counts prompts):

    1. sample      G completions per prompt with the current policy (algos/rollout.py: decode
                   copy in the compute dtype, each prompt prefilled once, key from state.rng),
                   log-probs recomputed by the training forward at the sampling temperature
    2. reward      Python reward functions on the decoded text and/or a reward model in-graph
                   (algos/scoring.py) -> R_i, NaN = unscorable
    3. update      one jitted function, the state donated: DAPO overlong shaping, advantages
                   (GRPO: group-relative; RLOO: leave-one-out on the k1-penalised reward), masks
                   (truncated completions, DAPO dynamic sampling), reference log-probs, then
                   `scan_updates`: num_iterations (μ) x num_minibatches gradient steps of the
                   clipped surrogate, each a `gradient_step` of the same loop

so checkpoints, SIGTERM and evals fall on iteration boundaries, and a resumed run replays the
same samples (everything random derives from `state.rng`). With μ = 1 the old log-probs are the
update's own (stop-gradient), so ρ ≡ 1 exactly; with μ > 1 they are the rollout's.

Gradient accumulation is exact for every `loss_type`: each microbatch's loss is normalised over
itself and weighted by its completion tokens (dapo: a token mean over the accumulated batch) or
its rows (grpo, bnpo, dr_grpo: TRL averages those per microbatch).

Metrics (TRL's names): reward, reward_std, rewards/<fn>/mean|std, frac_reward_zero_std,
completions/{mean,min,max}_length, completions/clipped_ratio, completions/mean_terminated_length,
kl, entropy, clip_ratio/*, sampling/logp_difference/{mean,max}, time/rollout, time/update, and
mfu/rollout, mfu/update (generation + scoring FLOPs, update FLOPs, each over its own time).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxpost.algos import iteration, scoring, shared_groups
from jaxpost.algos.rollout import RolloutConfig, frozen_logprobs, logp_difference
from jaxpost.losses import grpo as grpo_math
from jaxpost.losses.logprobs import DEFAULT_CHUNK_SIZE, model_token_stats
from jaxpost.train import sharding as sh
from jaxpost.train.algorithms import Algorithm, register
from jaxpost.train.step import gradient_step, scan_updates

log = logging.getLogger(__name__)
SEQUENCE_FIELDS = ("input_ids", "attention_mask", "positions")
LOOP_KEYS = ("num_iterations", "num_minibatches")  # section keys that are not loss keys


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything an iteration needs from the config, parsed and checked once."""
  family: str                  # "grpo" | "rloo"
  loss: Any                    # GRPOConfig | RLOOConfig
  rollout: RolloutConfig
  num_iterations: int
  num_minibatches: int
  chunk_size: int

  @property
  def num_generations(self) -> int:
    return self.loss.num_generations

  @property
  def beta(self) -> float:
    return self.loss.beta


def _loss_config(family: str, section, max_new_tokens: int):
  cls = grpo_math.GRPOConfig if family == "grpo" else grpo_math.RLOOConfig
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(section) - fields - set(LOOP_KEYS))
  if unknown:
    raise ValueError(f"config.{family}.{unknown[0]} is not a {family} key; known: "
                     f"{sorted(fields | set(LOOP_KEYS))}")
  values = {k: v for k, v in section.items() if k in fields}
  if family == "grpo":
    values["max_completion_length"] = max_new_tokens
  return cls(**values)


def settings(config) -> Settings:
  """`Settings` of a grpo / rloo run; ValueError naming the key of a bad value."""
  family = config.algorithm
  section = config.get(family, None)
  if section is None:
    raise ValueError(f"config.algorithm={family!r} needs a config.{family} section "
                     f"(configs/{family}.py)")
  section = section.to_dict()
  ro = config.rollout
  loss = _loss_config(family, section, ro.max_new_tokens)
  for key in LOOP_KEYS:
    if int(section.get(key, 1)) < 1:
      raise ValueError(f"config.{family}.{key} must be >= 1, got {section.get(key)}")
  if ro.max_new_tokens < 1 or ro.temperature < 0:
    raise ValueError(f"config.rollout.max_new_tokens must be >= 1 and temperature >= 0, got "
                     f"{ro.max_new_tokens}, {ro.temperature}")
  num_iterations = int(section.get("num_iterations", 1))
  # π_old is needed before the first update for μ > 1 (ratios) and RLOO's KL-penalised reward;
  # otherwise the first update's own forward is π_old and the rollout skips its recompute.
  needs_old = num_iterations > 1 or (family == "rloo" and loss.beta > 0)
  rollout = RolloutConfig(num_generations=loss.num_generations, max_new_tokens=ro.max_new_tokens,
                          temperature=ro.temperature, top_k=ro.top_k, top_p=ro.top_p,
                          chunk_size=int(config.get("logprob_chunk_size", DEFAULT_CHUNK_SIZE)),
                          recompute_logprobs=needs_old)
  return Settings(family, loss, rollout, num_iterations,
                  int(section.get("num_minibatches", 1)), rollout.chunk_size)


def check_keys(config):
  """Algorithm.check_config: the section, the rollout and reward keys, and that R = B x G rows
  split into num_minibatches x grad_accum microbatches that divide over the batch mesh axes."""
  s = settings(config)
  scoring.check_reward_keys(config)
  rows = config.batch_size * s.num_generations
  parts = s.num_minibatches * config.grad_accum
  if rows % parts:
    raise ValueError(f"config.batch_size={config.batch_size} prompts x "
                     f"config.{s.family}.num_generations={s.num_generations} = {rows} rows do not "
                     f"split into config.{s.family}.num_minibatches={s.num_minibatches} x "
                     f"config.grad_accum={config.grad_accum} microbatches")


# --- the loss of one microbatch ----------------------------------------------------------------

def rollout_loss(s: Settings, params, frozen, batch, rng, ctx):
  """Clipped-surrogate loss of one microbatch of rollout rows, or of whole prefix-shared groups
  (`shared_groups.grouped_batch`), see the module docstring."""
  del frozen
  kwargs = {"chunk_size": s.chunk_size, "temperature": s.rollout.scoring_temperature,
            "dropout_rng": rng if ctx.training else None}
  if shared_groups.is_grouped(batch):
    stats = shared_groups.grouped_token_stats(ctx.model, params, batch, **kwargs)
    batch = shared_groups.ungrouped(batch)
  else:
    stats = model_token_stats(ctx.model, params, batch, **kwargs)
  logps, mask = stats["logprobs"], batch["loss_mask"]
  old = batch.get("old_logps")
  if s.family == "rloo":
    old = jax.lax.stop_gradient(logps) if old is None else old
    loss, metrics = grpo_math.rloo_loss(logps, old, batch["advantages"], mask, s.loss.epsilon,
                                        s.loss.epsilon_high, entropy=stats["entropy"])
  else:
    loss, metrics = grpo_math.grpo_loss(s.loss, logps, batch["advantages"], mask, old_logps=old,
                                        ref_logps=batch.get("ref_logps"),
                                        entropy=stats["entropy"])
  if "sampler_logps" in batch:  # the rollout did not recompute: this forward is π_old
    metrics.update(logp_difference(jax.lax.stop_gradient(logps), batch["sampler_logps"], mask))
  return loss, metrics


def row_weights(batch) -> jax.Array:
  """Microbatch weight: the sum of its rows' `weight` (tokens for dapo, 1 per row otherwise)."""
  return jnp.sum(batch["weight"].astype(jnp.float32))


# --- one iteration -----------------------------------------------------------------------------

def advantages_and_mask(s: Settings, rewards, rollout: dict, ref_logps):
  """(advantages [R], loss mask [R, L], metrics) from the rewards and the rollout."""
  mask = rollout["completion_mask"].astype(jnp.float32)
  if s.family == "rloo":
    valid = jnp.isfinite(rewards)
    metrics = {}
    if ref_logps is not None and s.beta > 0:
      rewards, metrics = grpo_math.rloo_rewards(rewards, rollout["logprobs"], ref_logps, mask,
                                                s.beta)
    adv = grpo_math.rloo_advantages(rewards, s.num_generations, valid,
                                    s.loss.normalize_advantages)
    return adv, mask, metrics
  cfg = s.loss
  if cfg.overlong_buffer > 0:
    rewards = rewards + grpo_math.overlong_penalty(rollout["completion_lengths"],
                                                   cfg.max_completion_length, cfg.overlong_buffer)
  valid = jnp.isfinite(rewards)
  adv, metrics = grpo_math.group_advantages(rewards, s.num_generations, valid, cfg.scale_rewards)
  if cfg.mask_truncated_completions:
    mask = grpo_math.mask_truncated_completions(mask, rollout["finished"])
  if cfg.dynamic_sampling:
    mask = mask * grpo_math.dynamic_sampling_mask(rewards, s.num_generations,
                                                  valid)[:, None].astype(mask.dtype)
  return adv, mask, {"frac_reward_zero_std": metrics["frac_reward_zero_std"]}


def make_iteration_update(s: Settings, setup, ref_module):
  """update(state, frozen, rollout fields, rewards) -> (state, metrics), jitted, state donated."""
  update = gradient_step(setup.algorithm, setup.ctx, setup.tx, setup.schedule, setup.config.grad_accum,
                         setup.mesh, setup.state_shardings.params)
  dapo = s.family == "grpo" and s.loss.loss_type == "dapo"

  def one_iteration(state, frozen, rollout, rewards):
    if "group_order" in rollout:  # the shared rows' layout (shared_groups.row_layout)
      rollout, order = dict(rollout), rollout["group_order"]
      del rollout["group_order"]
      rollout, rewards = shared_groups.in_row_order((rollout, rewards), order, s.num_generations)
    ref_logps = None
    if "ref" in frozen:
      ref_logps = frozen_logprobs(ref_module, frozen["ref"], rollout, s.rollout)
    adv, mask, metrics = advantages_and_mask(s, rewards, rollout, ref_logps)
    per_row = {"loss_mask": mask, "advantages": adv,
               "weight": mask.sum(-1) if dapo else jnp.ones(mask.shape[0], jnp.float32)}
    if s.num_iterations > 1:
      per_row["old_logps"] = rollout["logprobs"]
    if not s.rollout.recompute_logprobs:
      per_row["sampler_logps"] = rollout["sampler_logprobs"]
    if ref_logps is not None and s.family == "grpo":
      per_row["ref_logps"] = ref_logps
    if s.rollout.prefix_sharing:
      batch = shared_groups.grouped_batch(rollout, per_row, s.num_generations,
                                          s.rollout.shared_width, s.rollout.groups_per_row)
    else:
      batch = {**{k: rollout[k] for k in SEQUENCE_FIELDS}, **per_row}
    rng = jax.random.fold_in(state.rng, iteration.MINIBATCH_STREAM)
    state, update_metrics = scan_updates(update, state, frozen, batch, s.num_iterations,
                                         s.num_minibatches, setup.mesh, rng)
    return state, {**update_metrics, **metrics}

  rep = sh.replicated(setup.mesh)
  return jax.jit(one_iteration, in_shardings=(setup.state_shardings, setup.frozen_shardings,
                                          setup.batch_sharding, setup.batch_sharding),
                 out_shardings=(setup.state_shardings, rep), donate_argnums=(0,))


def iteration_flops(s: Settings, cfg, prompt_width: int, rows: int, weight_grads: bool,
                    reference: bool, shared_width=None) -> tuple[float, float]:
  """(rollout FLOPs, update FLOPs) of one iteration (model FLOPs, PaLM appendix B): the rollout's
  (`iteration.rollout_flops`); the update adds the reference forward and μ passes of forward +
  backward over the R rows, as wide as the update laid them out (`shared_width`)."""
  narrowed = dataclasses.replace(s.rollout, shared_width=shared_width)
  forward = iteration.rows_pass_flops(cfg, narrowed, prompt_width, rows)
  backward = (3 if weight_grads else 2) * forward * s.num_iterations
  return (iteration.rollout_flops(cfg, s.rollout, prompt_width, rows),
          backward + (forward if reference else 0.0))


def shared_groups_per_row(config, s: Settings, mesh) -> int:
  """k of the update's prefix-shared rows (`data.prefix_sharing`, G > 1; 0: unshared): whole
  groups must split into num_minibatches x grad_accum microbatches over the data-parallel
  devices (otherwise the rows stay unshared, and the log says why); each microbatch's groups on
  one device are packed into rows of k (`shared_groups.groups_per_row`)."""
  if not config.data.get("prefix_sharing", False) or s.num_generations == 1:
    return 0
  parts = s.num_minibatches * config.grad_accum
  parallel = math.prod(mesh.shape[a] for a in sh.BATCH_AXES) if mesh is not None else 1
  if config.batch_size % (parts * parallel):
    log.info("prefix sharing off for this run: config.batch_size=%d groups do not split into "
             "%d microbatches x %d data-parallel devices", config.batch_size, parts, parallel)
    return 0
  group_width = shared_groups.full_width(config.data.max_length, s.num_generations,
                                         s.rollout.max_new_tokens)
  return shared_groups.groups_per_row(config.batch_size // (parts * parallel), group_width)


def make_step(setup):
  """Algorithm.make_step of grpo / rloo: one iteration per loop step (module docstring). With
  prefix sharing the update packs the groups into rows as wide as the sampled completions need
  (`shared_groups.row_layout`, logged as `update/shared_width` and `update/shared_fill`, the
  real tokens' share of the rows): one update per width (`iteration.compiled_per_shape`: its
  compilation is logged apart as `time/compile`)."""
  s = settings(setup.config)
  k = shared_groups_per_row(setup.config, s, setup.mesh)
  s = dataclasses.replace(s, rollout=dataclasses.replace(s.rollout, prefix_sharing=k > 0,
                                                         groups_per_row=max(k, 1)))
  lora = "lora_base" in setup.frozen_shardings
  reference = "ref" in setup.frozen_shardings
  updates = {}

  def update(state, frozen, rollout, rewards):
    width, metrics = None, {}
    if k:
      rollout, width, metrics = laid_out(s, rollout, setup.batch_sharding)
    if width not in updates:
      narrowed = dataclasses.replace(s.rollout, shared_width=width)
      updates[width] = iteration.compiled_per_shape(make_iteration_update(
          dataclasses.replace(s, rollout=narrowed), setup, setup.ctx.modules.get("ref")))
    state, update_metrics = updates[width](state, frozen, rollout, rewards)
    return state, {**update_metrics, **metrics}

  def flops(width, rows, metrics):
    return iteration_flops(s, setup.policy.model.cfg, width, rows, not lora, reference,
                           metrics.get("update/shared_width"))

  return iteration.make_iteration_step(setup, s.rollout, update, flops)


def laid_out(s: Settings, rollout: dict, batch_sharding) -> tuple[dict, int, dict]:
  """(rollout + its `group_order`, the shared width, metrics) of `shared_groups.row_layout` on
  the sampled lengths (host values)."""
  completion = scoring.host_array(rollout["completion_lengths"])
  prompt = scoring.host_array(rollout["attention_mask"]).sum(-1) - completion
  prompt_width = rollout["input_ids"].shape[1] - s.rollout.max_new_tokens
  k, g = s.rollout.groups_per_row, s.num_generations
  order, width, fill = shared_groups.row_layout(
      prompt[::g], completion, g, k,
      shared_groups.full_width(prompt_width, g, s.rollout.max_new_tokens, k))
  order = jax.make_array_from_callback(order.shape, batch_sharding, lambda index: order[index])
  return ({**rollout, "group_order": order}, width,
          {"update/shared_width": width, "update/shared_fill": fill})


# --- frozen trees ------------------------------------------------------------------------------

def rollout_frozen(ctx):
  """prepare_frozen: the reference (when β > 0: `ref.name_or_path` or the initial policy) and
  the reward model (`reward.model`)."""
  return iteration.frozen_models(ctx, reference=settings(ctx.config).beta > 0)


def updates_per_step(config) -> int:
  s = settings(config)
  return s.num_iterations * s.num_minibatches


def batch_loss(params, frozen, batch, rng, ctx):
  """Algorithm.loss_fn: `rollout_loss` with the run's settings (parsed at trace time)."""
  return rollout_loss(settings(ctx.config), params, frozen, batch, rng, ctx)


def _register(name: str) -> Algorithm:
  return register(Algorithm(
      name=name, loss_fn=batch_loss, weight_fn=row_weights, loader_kind="prompt",
      prepare_frozen=rollout_frozen, make_step=make_step, updates_per_step=updates_per_step,
      check_config=check_keys, evals=("rollout", "task")))


GRPO = _register("grpo")
RLOO = _register("rloo")
