"""PPO-RLHF with a trained critic (algorithm "ppo"; Ziegler et al. 2019, Ouyang et al. 2022).

The math is in `jaxpost/losses/ppo.py`; this file is the glue. The trainable tree has two
members, `state.params = {"policy": ..., "value": ...}` (`Algorithm.members`), optimised by one
`optax.multi_transform` (the critic's optimiser is `config.optimizer` with the overrides of
`config.critic.optimizer`) and differentiated by one backward of L_pg + vf_coef · L_v
(− ent_coef · H, an entropy bonus whose gradient the chunked LM head carries). The
critic is a scalar-head model (`head="score"`): `critic.name_or_path`, else the reward model
`reward.model`, else the policy's initial weights with a fresh score head. A fresh head (no
trained `score.weight` in the checkpoint) starts at zero, so V ≡ 0 before the first update
instead of noise of the hidden states' scale (the zero-initialised value head of Ziegler et al.
2019's lm-human-preferences; Huang et al. 2023, "The N Implementation Details of RLHF with
PPO"); the trunk's gradient flows once the head has moved. With
`critic.share_backbone=True` the critic is only that model's score head, read on the POLICY's
final hidden states: one forward gives logits and values, and the value loss also trains the
policy's trunk (the "value" member is the head alone). `critic.warmup_steps` first iterations
train the critic alone (the policy term weighs 0; with a shared backbone the value loss still
moves the trunk). V_t, the value of the state before token
t, is the critic's output at position t − 1 (as TRL).

One loop step is one iteration (`algos/iteration.py`) on B prompts x G samples (G =
`ppo.num_generations`, 1 by default):

    1. sample    with the current policy; π_old = the sampler's log-probs (fp32, no top-k /
                 top-p: the same distribution), else recomputed by the training forward
                 (`needs_recompute`; then sampling/logp_difference/* are logged)
    2. score     reward model in-graph and/or Python reward functions -> R (unscorable: 0)
    3. update    one jit, state donated: reference log-probs, values V_old (no gradient),
                 per-token rewards with β = state.extra["kl_coef"], GAE, whitened advantages,
                 then `scan_updates`: ppo.num_epochs x ppo.num_minibatches gradient steps of
                 the clipped surrogate + clipped value loss; then β's adaptive update
                 (ppo.kl_target set) from this iteration's KL, stored in state.extra

Everything random derives from `state.rng` and β lives in `state.extra`, so a resumed run
replays the same iterations bitwise.

Metrics (TRL's experimental PPOTrainer names): objective/kl (mean over rows of Σ_t KL_t),
objective/entropy (mean of −Σ_t log π_old), objective/non_score_reward (mean of −β Σ_t KL_t),
objective/rlhf_reward (that + the mean score), objective/scores, policy/approxkl_avg,
policy/clipfrac_avg, policy/entropy_avg, loss/policy_avg, loss/value_avg, val/clipfrac_avg,
val/ratio (averaged over every update of the iteration), val/num_eos_tokens (completions that
ended with a stop token), kl_coef (the β this iteration used), critic/vf_explained_var (of
V_old against this iteration's returns), grad_norm/policy, grad_norm/value, plus the rollout's
completions/*, rewards/*, time/* and mfu/*.

Where TRL differs: it adds the score one position AFTER the EOS (where the critic still has a
value), which discounts it by λ; here it is added at the last completion token and V = 0 after
it, as in the formulas of DESIGN.md.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpost.algos import iteration, scoring
from jaxpost.algos.rollout import RolloutConfig, frozen_logprobs
from jaxpost.hf import has_score_head
from jaxpost.losses import ppo as ppo_math
from jaxpost.losses.logprobs import DEFAULT_CHUNK_SIZE, model_token_stats
from jaxpost.train import sharding as sh
from jaxpost.train.algorithms import POLICY, Algorithm, Member, applied_params, register
from jaxpost.train.optim import check_optimizer_config
from jaxpost.train.step import gradient_step, scan_updates

VALUE = "value"
SEQUENCE_FIELDS = ("input_ids", "attention_mask", "positions")
LOOP_KEYS = ("num_epochs", "num_minibatches", "num_generations")
CRITIC_KEYS = ("name_or_path", "optimizer", "share_backbone", "warmup_steps")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything an iteration needs from the config, parsed and checked once."""
  loss: ppo_math.PPOConfig
  rollout: RolloutConfig
  num_epochs: int
  num_minibatches: int
  share_backbone: bool = False
  critic_warmup: int = 0  # first iterations that train the critic alone (policy term off)

  @property
  def reference(self) -> bool:
    """Whether the KL term (so the reference model) is needed."""
    return self.loss.kl_coef > 0 or self.loss.kl_target is not None


def settings(config) -> Settings:
  """`Settings` of a ppo run; ValueError naming the key of a bad value."""
  section = config.get("ppo", None)
  if section is None:
    raise ValueError("config.algorithm='ppo' needs a config.ppo section (configs/ppo.py)")
  section = section.to_dict()
  fields = {f.name for f in dataclasses.fields(ppo_math.PPOConfig)}
  unknown = sorted(set(section) - fields - set(LOOP_KEYS))
  if unknown:
    raise ValueError(f"config.ppo.{unknown[0]} is not a ppo key; known: "
                     f"{sorted(fields | set(LOOP_KEYS))}")
  loss = ppo_math.PPOConfig(**{k: v for k, v in section.items() if k in fields})
  for key in LOOP_KEYS:
    if int(section.get(key, 1)) < 1:
      raise ValueError(f"config.ppo.{key} must be >= 1, got {section.get(key)}")
  ro = config.rollout
  if ro.max_new_tokens < 1 or ro.temperature < 0:
    raise ValueError(f"config.rollout.max_new_tokens must be >= 1 and temperature >= 0, got "
                     f"{ro.max_new_tokens}, {ro.temperature}")
  rollout = RolloutConfig(num_generations=int(section.get("num_generations", 1)),
                          max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
                          top_k=ro.top_k, top_p=ro.top_p,
                          chunk_size=int(config.get("logprob_chunk_size", DEFAULT_CHUNK_SIZE)),
                          recompute_logprobs=needs_recompute(config))
  critic = (config.get("critic", None) or {})
  warmup = int(critic.get("warmup_steps", 0))
  if warmup < 0:
    raise ValueError(f"config.critic.warmup_steps must be >= 0, got {warmup}")
  return Settings(loss, rollout, int(section.get("num_epochs", 4)),
                  int(section.get("num_minibatches", 1)),
                  bool(critic.get("share_backbone", False)), warmup)


def needs_recompute(config) -> bool:
  """Whether π_old needs the rollout's recompute with the training forward: unless the sampler's
  log-probs are already those of π_θ at the sampling temperature up to fp32 rounding, i.e. with
  top-k / top-p off (they sample from a truncated q ≠ π) and fp32 compute (a bf16 KV-cached
  decode drifts from the full forward by ~1e-2 nats). TRL's PPOTrainer always takes them from
  its generate call."""
  ro = config.rollout
  return ro.top_k > 0 or ro.top_p < 1.0 or config.model.dtype != "float32"


def critic_optimizer(config):
  """`config.optimizer` with the overrides of `config.critic.optimizer` (its own learning rate,
  clipping, ...); ValueError naming a key that is not an optimiser key or a bad value."""
  opt = config.optimizer.copy_and_resolve_references()
  critic = config.get("critic", None)
  overrides = critic.get("optimizer", {}) if critic is not None else {}
  for key, value in dict(overrides).items():
    if key not in opt:
      raise ValueError(f"config.critic.optimizer.{key} is not an optimizer key; known: "
                       f"{sorted(opt)}")
    opt[key] = value
  try:
    check_optimizer_config(opt)
  except ValueError as err:
    raise ValueError(f"config.critic.optimizer (config.optimizer + its overrides): {err}") from err
  return opt


def check_keys(config):
  """Algorithm.check_config: ppo, critic, rollout and reward keys, and that R = B x G rows split
  into num_minibatches x grad_accum microbatches."""
  s = settings(config)
  critic = config.get("critic", None)
  if critic is not None:
    unknown = sorted(set(critic) - set(CRITIC_KEYS))
    if unknown:
      raise ValueError(f"config.critic.{unknown[0]} is not a critic key; known: {CRITIC_KEYS}")
  critic_optimizer(config)
  scoring.check_reward_keys(config)
  rows = config.batch_size * s.rollout.num_generations
  if rows % (s.num_minibatches * config.grad_accum):
    raise ValueError(f"config.batch_size={config.batch_size} prompts x "
                     f"config.ppo.num_generations={s.rollout.num_generations} = {rows} rows do not "
                     f"split into config.ppo.num_minibatches={s.num_minibatches} x "
                     f"config.grad_accum={config.grad_accum} microbatches")


# --- the critic ----------------------------------------------------------------------------------

def shifted(scores):
  """V [R, L] from per-position scores: V_t = score_{t−1} (the state before token t), V_0 = 0."""
  return jnp.pad(scores[:, :-1], ((0, 0), (1, 0)))


def token_values(module, params, rows: dict):
  """V [R, L] of a separate critic model."""
  return shifted(module.apply({"params": params}, rows["input_ids"], rows["attention_mask"],
                              rows.get("positions")))


def head_values(hidden, head):
  """V [R, L] of a shared-backbone critic: its score head {"score": {"kernel": [D, 1]}} on the
  policy's final hidden states [R, L, D]."""
  kernel = head["score"]["kernel"].astype(hidden.dtype)
  return shifted(jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)[..., 0])


def rollout_values(s: Settings, policy, value_module, params, rows: dict):
  """V_old [R, L] (no gradient) of the applied {"policy", "value"} tree on rollout rows."""
  if s.share_backbone:
    hidden = policy.apply({"params": params[POLICY]}, rows["input_ids"], rows["attention_mask"],
                          rows.get("positions"), method="hidden_states")
    values = head_values(hidden, params[VALUE])
  else:
    values = token_values(value_module, params[VALUE], rows)
  return jax.lax.stop_gradient(values)


def critic_member(ctx) -> dict:
  """Algorithm.members: {"value": the critic} (module docstring for where it starts from)."""
  config = ctx.config
  critic = config.get("critic", None)
  name = (critic.get("name_or_path", "") if critic is not None else "") or \
      scoring.reward_section(config).get("model", "")
  optimizer = critic_optimizer(config)
  loaded = ctx.load(name_or_path=name or None, head="score", seed=config.seed + 1)
  if loaded.config.vocab_size != ctx.policy.config.vocab_size:
    raise ValueError(f"critic {name!r} has a vocabulary of {loaded.config.vocab_size} tokens, "
                     f"the policy {ctx.policy.config.vocab_size}: it reads the policy's rows")
  params = loaded.params
  if not name or not has_score_head(name):  # a fresh head starts at V = 0 (module docstring)
    params = {**params, "score": jax.tree.map(lambda x: x * 0, params["score"])}
  if settings(config).share_backbone:  # the head alone, on the policy's trunk
    return {VALUE: Member({"score": params["score"]}, None, optimizer)}
  if not name:  # the policy's initial trunk (a copy: the policy's params are donated)
    params = {**params, "model": jax.tree.map(jnp.copy, ctx.policy.params["model"])}
  return {VALUE: Member(params, loaded.model, optimizer)}


# --- the loss of one microbatch ------------------------------------------------------------------

def rollout_loss(s: Settings, params, frozen, batch, rng, ctx):
  """L_pg + vf_coef · L_v (− ent_coef · H) of one microbatch of rollout rows; `params` =
  {"policy", "value"}."""
  del frozen
  stats = model_token_stats(ctx.model, params[POLICY], batch, chunk_size=s.rollout.chunk_size,
                            temperature=s.rollout.scoring_temperature,
                            dropout_rng=rng if ctx.training else None,
                            return_hidden=s.share_backbone,
                            entropy_grad=s.loss.ent_coef > 0)
  if s.share_backbone:  # one forward: logits and values from the same hidden states
    values = head_values(stats["hidden"], params[VALUE])
  else:
    values = token_values(ctx.modules[VALUE], params[VALUE], batch)
  weight = jnp.mean(batch["policy_weight"]) if "policy_weight" in batch else 1.0
  return ppo_math.ppo_loss(s.loss, stats["logprobs"], values, batch, stats["entropy"], weight)


def batch_loss(params, frozen, batch, rng, ctx):
  """Algorithm.loss_fn: `rollout_loss` with the run's settings (parsed at trace time)."""
  return rollout_loss(settings(ctx.config), params, frozen, batch, rng, ctx)


# --- one iteration -------------------------------------------------------------------------------

def advantages(s: Settings, kl_coef, scores, rollout: dict, ref_logps, values):
  """(training batch fields, metrics) from the rollout, its scores [R] and values [R, L]:
  shaped scores, per-token rewards, GAE and whitened advantages."""
  cfg = s.loss
  mask = rollout["completion_mask"].astype(jnp.float32)
  old_logps = rollout["logprobs" if s.rollout.recompute_logprobs else "sampler_logprobs"]
  scores = jnp.where(jnp.isfinite(scores), scores, 0.0)
  scores = ppo_math.shape_scores(scores, rollout["finished"], cfg.missing_eos_penalty,
                                 cfg.reward_clip)
  rewards, kl = ppo_math.token_rewards(scores, old_logps, ref_logps, mask, kl_coef,
                                       cfg.kl_estimator)
  if cfg.whiten_rewards:
    rewards = ppo_math.masked_whiten(rewards, mask, shift_mean=False) * mask
  adv, returns = ppo_math.gae(rewards, values, mask, cfg.gamma, cfg.lam)
  adv = ppo_math.masked_whiten(adv, mask) * mask
  fields = {**{k: rollout[k] for k in SEQUENCE_FIELDS}, "loss_mask": mask, "advantages": adv,
            "returns": returns, "old_values": values * mask, "old_logps": old_logps}
  non_score = jnp.mean(jnp.sum(-kl_coef * kl, axis=-1))
  metrics = {"objective/kl": jnp.mean(jnp.sum(kl, axis=-1)),
             "objective/entropy": jnp.mean(jnp.sum(-old_logps * mask, axis=-1)),
             "objective/non_score_reward": non_score,
             "objective/rlhf_reward": non_score + jnp.mean(scores),
             "objective/scores": jnp.mean(scores),
             "val/num_eos_tokens": jnp.sum(rollout["finished"].astype(jnp.float32)),
             "critic/vf_explained_var": ppo_math.explained_variance(values, returns, mask),
             "kl_coef": jnp.asarray(kl_coef, jnp.float32)}
  return fields, metrics


def make_iteration_update(s: Settings, setup):
  """update(state, frozen, rollout fields, scores) -> (state, metrics), jitted, state donated."""
  update = gradient_step(setup.algorithm, setup.ctx, setup.tx, setup.schedule,
                         setup.config.grad_accum, setup.mesh, setup.state_shardings.params)
  ref_module, value_module = setup.ctx.modules.get("ref"), setup.ctx.modules.get(VALUE)
  controller = s.loss.controller()

  def one_iteration(state, frozen, rollout, scores):
    ref_logps = None
    if "ref" in frozen:
      ref_logps = frozen_logprobs(ref_module, frozen["ref"], rollout, s.rollout)
    values = rollout_values(s, setup.ctx.model, value_module, applied_params(state.params, frozen),
                            rollout)
    kl_coef = state.extra["kl_coef"]
    batch, metrics = advantages(s, kl_coef, scores, rollout, ref_logps, values)
    warming = state.step // (s.num_epochs * s.num_minibatches) < s.critic_warmup
    batch["policy_weight"] = jnp.full(scores.shape, jnp.where(warming, 0.0, 1.0), jnp.float32)
    rng = jax.random.fold_in(state.rng, iteration.MINIBATCH_STREAM)
    state, update_metrics = scan_updates(update, state, frozen, batch, s.num_epochs,
                                         s.num_minibatches, setup.mesh, rng)
    next_coef = controller.update(kl_coef, metrics["objective/kl"], scores.shape[0])
    state = state.replace(extra={**state.extra, "kl_coef": next_coef})
    return state, {**update_metrics, **metrics}

  rep = sh.replicated(setup.mesh)
  return jax.jit(one_iteration, in_shardings=(setup.state_shardings, setup.frozen_shardings,
                                          setup.batch_sharding, setup.batch_sharding),
                 out_shardings=(setup.state_shardings, rep), donate_argnums=(0,))


def iteration_flops(s: Settings, cfg, critic_cfg, prompt_width: int, rows: int,
                    weight_grads: bool, reference: bool) -> tuple[float, float]:
  """(rollout FLOPs, update FLOPs): the rollout's (`iteration.rollout_flops`); the update adds
  the reference and critic forwards (a shared-backbone critic, `critic_cfg` None: a policy
  trunk forward), then num_epochs passes of forward + backward of both (of the policy only)."""
  width = prompt_width + s.rollout.max_new_tokens
  policy = iteration.rows_forward_flops(cfg, width, rows)
  critic = iteration.rows_forward_flops(critic_cfg, width, rows) if critic_cfg else 0.0
  passes = s.num_epochs * ((3 if weight_grads else 2) * policy + 3 * critic)
  critic = critic or policy  # the values' forward
  return (iteration.rollout_flops(cfg, s.rollout, prompt_width, rows),
          passes + critic + (policy if reference else 0.0))


def make_step(setup):
  """Algorithm.make_step of ppo: one iteration per loop step (module docstring)."""
  s = settings(setup.config)
  lora = "lora_base" in setup.frozen_shardings
  reference = "ref" in setup.frozen_shardings
  critic_cfg = None if s.share_backbone else setup.ctx.modules[VALUE].cfg
  flops = lambda width, rows, _: iteration_flops(s, setup.policy.model.cfg, critic_cfg, width,
                                                 rows, not lora, reference)
  update = iteration.compiled_per_shape(make_iteration_update(s, setup))
  return iteration.make_iteration_step(setup, s.rollout, update, flops)


def prepare_frozen(ctx):
  """The reference (when the KL term is on) and the reward model."""
  return iteration.frozen_models(ctx, reference=settings(ctx.config).reference)


def updates_per_step(config) -> int:
  s = settings(config)
  return s.num_epochs * s.num_minibatches


def init_extra(config) -> dict:
  """state.extra: the KL coefficient β (adaptive with ppo.kl_target), checkpointed."""
  return {"kl_coef": settings(config).loss.controller().initial()}


PPO = register(Algorithm(
    name="ppo", loss_fn=batch_loss, loader_kind="prompt", prepare_frozen=prepare_frozen,
    members=critic_member, make_step=make_step, updates_per_step=updates_per_step,
    init_extra=init_extra, check_config=check_keys, evals=("rollout", "task")))
