"""One rollout iteration as one loop step, shared by the rollout algorithms (grpo, rloo, ppo).

    step(state, frozen, batch):
      1. sample   (jitted) G completions per prompt with the current policy (algos/rollout.py),
                  and the reward model's scores in-graph when there is one; key from state.rng
      2. score    (host) Python reward functions on the decoded text + the model scores
                  (algos/scoring.py) -> rewards [R] (NaN = unscorable), as a sharded array
      3. update   (jitted, state donated) the algorithm's own: advantages and its scan of
                  gradient steps (`train/step.py` `scan_updates`)

plus TRL's completion metrics (completions/*), time/rollout, time/update and mfu/rollout,
mfu/update from the algorithm's FLOP count. `compiled_per_shape` compiles an update ahead of its
first call on each rollout shape and reports the seconds as time/compile, which time/update and
the loop's step_time leave out. `frozen_models` builds the frozen trees these algorithms share:
the reference and the reward model.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from jaxpost.algos import scoring, shared_groups
from jaxpost.algos.rollout import RolloutConfig, sample_rollout
from jaxpost.models.config import forward_flops_per_token
from jaxpost.train.algorithms import applied_policy
from jaxpost.train.metrics import peak_flops_per_device
from jaxpost.train.window import COMPILE_TIME

ROLLOUT_STREAM, MINIBATCH_STREAM = 0x5A, 0x5B  # fold_in tags of state.rng: sampling, minibatches


def make_sampler(model, reward_module, config: RolloutConfig, mesh):
  """sample(params, frozen, batch, rng) -> (rollout fields, reward-model scores or None,
  sampling metrics), jitted; `params` is the trainable tree (its policy part samples)."""

  @jax.jit
  def sample(params, frozen, batch, rng):
    rollout = sample_rollout(model, applied_policy(params, frozen), batch, rng, config, mesh)
    fields = {**rollout.sequences(), "completion_mask": rollout.completion_mask,
              "sampler_logprobs": rollout.sampler_logprobs,
              "completion_lengths": rollout.completion_lengths, "finished": rollout.finished}
    del fields["loss_mask"]
    if rollout.logprobs is not None:
      fields["logprobs"] = rollout.logprobs
    scores = (reward_module.scores(frozen["reward"], fields) if reward_module is not None
              else None)
    return fields, scores, rollout.metrics

  return sample


def completion_metrics(lengths: np.ndarray, finished: np.ndarray) -> dict:
  """TRL's completions/* metrics from lengths [R] (tokens, EOS included) and finished [R]."""
  lengths, finished = lengths.astype(np.float64), finished.astype(bool)
  ended = lengths[finished] if finished.any() else np.zeros(1)
  return {"completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
          "completions/max_length": lengths.max(),
          "completions/clipped_ratio": float(1.0 - finished.mean()),
          "completions/mean_terminated_length": ended.mean(),
          "completions/min_terminated_length": ended.min(),
          "completions/max_terminated_length": ended.max()}


def rows_forward_flops(cfg, width: int, rows: int) -> float:
  """Model FLOPs of one forward of `rows` rows of `width` tokens."""
  return forward_flops_per_token(cfg, width) * rows * width


def rows_pass_flops(cfg, config: RolloutConfig, prompt_width: int, rows: int) -> float:
  """Model FLOPs of one forward over the R rollout rows as laid out: R rows of width P + N, or
  with prefix sharing R / (G k) rows of the shared width (k groups per row;
  algos/shared_groups.py)."""
  if config.prefix_sharing:
    per_row = config.num_generations * config.groups_per_row
    width = config.shared_width or shared_groups.full_width(
        prompt_width, config.num_generations, config.max_new_tokens, config.groups_per_row)
    return rows_forward_flops(cfg, width, rows // per_row)
  return rows_forward_flops(cfg, prompt_width + config.max_new_tokens, rows)


def rollout_flops(cfg, config: RolloutConfig, prompt_width: int, rows: int) -> float:
  """Model FLOPs of a rollout (PaLM appendix B): the prefill of the R / G prompts of width P,
  R x N decode steps and, when it recomputes log-probs, one pass over the rows."""
  width = prompt_width + config.max_new_tokens
  prompts = rows // config.num_generations
  decode = forward_flops_per_token(cfg, width) * rows * config.max_new_tokens
  prefill = rows_forward_flops(cfg, prompt_width, prompts)
  recompute = (rows_pass_flops(cfg, config, prompt_width, rows) if config.recompute_logprobs
               else 0.0)
  return prefill + decode + recompute


def compiled_per_shape(jitted) -> Callable:
  """`jitted(state, frozen, rollout, rewards) -> (state, metrics)` compiled ahead of its first
  call on each rollout shape (the prompt width varies by batch), that step's metrics adding the
  compile seconds as COMPILE_TIME."""
  executables = {}

  def update(state, frozen, rollout, rewards):
    shape, compiled = rollout["input_ids"].shape, {}
    if shape not in executables:
      start = time.perf_counter()
      executables[shape] = jitted.lower(state, frozen, rollout, rewards).compile()
      compiled = {COMPILE_TIME: time.perf_counter() - start}
    state, metrics = executables[shape](state, frozen, rollout, rewards)
    return state, {**metrics, **compiled}

  return update


def make_iteration_step(setup, rollout_config: RolloutConfig, update: Callable,
                        flops: Callable[[int, int, dict], tuple]):
  """The loop step of a rollout algorithm (module docstring). `update(state, frozen, rollout
  fields, rewards) -> (state, metrics)` is the algorithm's jitted update; `flops(prompt_width,
  rows, update metrics) -> (rollout FLOPs, update FLOPs)` its model-FLOP count for MFU."""
  model = setup.policy.model
  reward_module = setup.ctx.modules.get("reward_model")
  scorer = scoring.Scorer(scoring.load_functions(setup.config), reward_module,
                          setup.policy.tokenizer, setup.loader, rollout_config.num_generations)
  sample = make_sampler(model, reward_module, rollout_config, setup.mesh)
  peak = jax.device_count() * peak_flops_per_device(setup.config.metrics.cpu_peak_flops)

  def step(state, frozen, batch):
    start = time.perf_counter()
    rng = jax.random.fold_in(state.rng, ROLLOUT_STREAM)
    rollout, model_scores, sampling = sample(state.params, frozen, batch, rng)
    rewards, reward_metrics = scorer(rollout["input_ids"], rollout["completion_mask"],
                                     batch["row"], model_scores)
    rollout_time = time.perf_counter() - start
    rewards = jax.make_array_from_callback(rewards.shape, setup.batch_sharding,
                                           lambda index: rewards[index])
    state, metrics = update(state, frozen, rollout, rewards)
    metrics = jax.device_get(metrics)
    update_time = time.perf_counter() - start - rollout_time - metrics.get(COMPILE_TIME, 0.0)
    rollout_flops, update_flops = flops(batch["prompt_input_ids"].shape[1], rewards.shape[0],
                                        metrics)
    host = completion_metrics(scoring.host_array(rollout["completion_lengths"]),
                              scoring.host_array(rollout["finished"]))
    metrics.update(jax.device_get(sampling), **reward_metrics, **host)
    metrics.update({"time/rollout": rollout_time, "time/update": update_time,
                    "mfu/rollout": rollout_flops / rollout_time / peak,
                    "mfu/update": update_flops / update_time / peak,
                    "flops": rollout_flops + update_flops})
    return state, metrics

  return step


def frozen_models(ctx, reference: bool):
  """prepare_frozen of the rollout algorithms: the reference when `reference`
  (`ref.name_or_path` or the initial policy) and the reward model (`reward.model`)."""
  frozen, modules = {}, {}
  if reference:
    frozen["ref"], modules["ref"] = ctx.reference(ctx.config.get("ref", {}).get("name_or_path",
                                                                                 ""))
  params, reward_model = scoring.load_reward_model(ctx, ctx.policy.config.vocab_size)
  if reward_model is not None:
    frozen["reward"], modules["reward_model"] = params, reward_model
  return frozen, modules
