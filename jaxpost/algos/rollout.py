"""Rollouts: G sampled completions per prompt, laid out for training, with their log-probs.

From a prompt batch (`data/batching.py` `prompt_batch`: LEFT-padded `prompt_input_ids` /
`prompt_attention_mask` [B, P]) and the current policy parameters, `sample_rollout`

  1. samples G completions of up to N = max_new_tokens tokens per prompt with generate.py's
     engine (each distinct prompt prefilled once, its KV cache repeated to its G rows), from a
     decode copy of the parameters in the compute dtype (resharded once to be whole over the
     "fsdp" mesh axis, still split over "tensor"). Row r = i * G + j is sample j of prompt
     i and draws step t with key fold_in(fold_in(rng, r), t);
  2. lays each of the R = B * G rows out as [prompt | completion] right-padded to L = P + N:
         input_ids        prompt tokens, completion tokens (EOS included), then pad
         attention_mask   1 on the prompt and completion tokens
         positions        0 .. len - 1 on them, 0 on padding
         completion_mask  1 on completion tokens up to and including the EOS, 0 elsewhere
  3. recomputes log pi(y_t | x, y_<t) with the TRAINING forward (`model_token_stats`, the chunked
     LM head) at the sampling temperature T: log softmax(z / T)[y_t] (T = 1 for greedy). Ratios
     and KL terms use these, so the loss sees the same numbers as the training forward.
  4. reports sampling/logp_difference/{mean, max} = mean / max over completion tokens of
     |recomputed - sampler| where the sampler's log-prob is log q(y_t), q the processed sampling
     distribution (temperature, top-k, top-p; the raw model log-prob under greedy). With top-k /
     top-p off they differ only by numerics (decode dtype, KV cache vs full forward).

All arrays have static shapes ([R, L], [R]) and, under a mesh, the training batch sharding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxpost.algos import shared_groups
from jaxpost.generate import default_pad_id, sample_tokens
from jaxpost.losses.logprobs import DEFAULT_CHUNK_SIZE, model_token_stats
from jaxpost.train.sharding import (DEFAULT_RULES, batch_sharding, constrain_rows,
                                   param_shardings, without_axis)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Static sampling settings of a rollout (hashable: they fix the compiled structure).

  num_generations: G completions per prompt. temperature 0 = greedy. stop_token_ids: None = the
  model config's EOS ids. chunk_size: positions per row per LM-head chunk of the recompute.
  recompute_logprobs: False skips step 3 (`logprobs` is None, no logp_difference metrics), for
  callers whose update recomputes them anyway (GRPO with one update per rollout: the update's
  own forward is π_old, and it reports logp_difference against `sampler_logprobs`).
  prefix_sharing: the recompute and `frozen_logprobs` run on [prompt | y_1 | ... | y_G] rows,
  `groups_per_row` groups per row (algos/shared_groups.py); same values, each prompt computed
  once. shared_width: the slots of a shared row (None: `shared_groups.full_width`, room for any
  completions; the GRPO update narrows it to the sampled lengths, `shared_groups.row_layout`,
  whose order the rows are then in).
  """
  num_generations: int
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_token_ids: Optional[tuple] = None
  chunk_size: int = DEFAULT_CHUNK_SIZE
  recompute_logprobs: bool = True
  prefix_sharing: bool = False
  shared_width: Optional[int] = None
  groups_per_row: int = 1

  def __post_init__(self):
    if not isinstance(self.num_generations, int) or self.num_generations < 1:
      raise ValueError(f"num_generations must be an int >= 1, got {self.num_generations!r}")
    if self.stop_token_ids is not None:
      object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))

  @property
  def scoring_temperature(self) -> float:
    """The T of the recomputed log-probs: the sampling temperature, 1 under greedy."""
    return self.temperature or 1.0


@flax.struct.dataclass
class Rollout:
  """R = B * G sequences [R, L] (row i * G + j: sample j of prompt i), see the module docstring.

  completion_lengths [R]: completion tokens (EOS included); finished [R]: ended with a stop token
  (False: truncated at max_new_tokens); prompt_index [R] = r // G; logprobs / sampler_logprobs
  [R, L]: the recomputed and the sampler's log-prob of input_ids[:, t] at completion positions t,
  0 elsewhere; metrics: the sampling/logp_difference scalars.
  """
  input_ids: jax.Array
  attention_mask: jax.Array
  positions: jax.Array
  completion_mask: jax.Array
  completion_lengths: jax.Array
  finished: jax.Array
  prompt_index: jax.Array
  logprobs: jax.Array
  sampler_logprobs: jax.Array
  metrics: dict

  def sequences(self) -> dict:
    """The training-batch fields of the rollout (`loss_mask` = the completion mask), as
    `model_token_stats` and the losses read them."""
    return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
            "positions": self.positions, "loss_mask": self.completion_mask}


def sample_rollout(model, params, batch: dict, rng, config: RolloutConfig, mesh=None) -> Rollout:
  """Samples `config.num_generations` completions per prompt of `batch` (its
  `prompt_input_ids` / `prompt_attention_mask`) with `params` (the tree the model applies: with
  LoRA, base + adapters, see `train/algorithms.applied_params`) and PRNG key `rng`; returns the
  `Rollout`. `mesh`: the training mesh (the batch is split like training batches)."""
  sharding = batch_sharding(mesh) if mesh is not None else None
  return _rollout(model, params, batch["prompt_input_ids"], batch["prompt_attention_mask"], rng,
                  config=config, sharding=sharding)


def decode_copy(params, model, mesh=None):
  """The parameters with floating leaves cast to the compute dtype (for decoding); on a mesh with
  an "fsdp" axis, resharded ONCE to be whole over it (`sharding.without_axis`), so decoding does
  not all-gather every layer for every token. Lives inside the rollout's jit: freed before the
  update."""
  dtype = jnp.dtype(model.cfg.dtype)
  cast = lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p
  copy = jax.tree.map(cast, params)
  if mesh is None or mesh.shape.get("fsdp", 1) == 1:
    return copy
  rules = without_axis(nn.get_logical_axis_rules() or DEFAULT_RULES, "fsdp")
  return jax.lax.with_sharding_constraint(copy, param_shardings(model, mesh, rules))


@functools.partial(jax.jit, static_argnames=("model", "config", "sharding"))
def _rollout(model, params, prompt_ids, prompt_mask, rng, *, config: RolloutConfig, sharding):
  greedy = config.temperature == 0.0
  sampled = sample_tokens(
      model, decode_copy(params, model, sharding.mesh if sharding is not None else None),
      prompt_ids, prompt_mask, rng,
      max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
      top_p=config.top_p, stop_token_ids=config.stop_token_ids, sharding=sharding,
      num_samples=config.num_generations)
  layout, align = training_layout(prompt_ids, prompt_mask, sampled["tokens"], sampled["lengths"],
                                  config.num_generations, default_pad_id(model.cfg))
  num_rows = sampled["tokens"].shape[0]
  sampler = sampled["logprobs" if greedy else "sampling_logprobs"]
  sampler_lp = align(jnp.zeros((num_rows, prompt_ids.shape[1]), jnp.float32), sampler)
  layout = {k: constrain_rows(v, sharding) for k, v in layout.items()}
  logprobs, metrics = None, {}
  if config.recompute_logprobs:
    logprobs = rows_logprobs(model, params, layout, config)
    metrics = logp_difference(logprobs, sampler_lp, layout["completion_mask"])
  return Rollout(
      **layout, completion_lengths=sampled["lengths"], finished=sampled["stopped"],
      prompt_index=jnp.arange(num_rows) // config.num_generations, logprobs=logprobs,
      sampler_logprobs=sampler_lp, metrics=metrics)


def training_layout(prompt_ids, prompt_mask, tokens, lengths, num_generations: int,
                    pad_id: int):
  """[prompt | completion] rows right-padded to P + N from left-padded prompts [B, P] (each
  repeated `num_generations` times) and completions `tokens` [R, N] with `lengths` [R].

  Returns ({`input_ids`, `attention_mask`, `positions`, `completion_mask`: [R, P + N]}, align)
  with `align(prompt_part [R, P], completion_part [R, N], fill=0)` moving per-position values into
  the same layout (`fill` on padding)."""
  prompt_ids = jnp.repeat(prompt_ids, num_generations, axis=0)
  prompt_len = jnp.repeat(prompt_mask.astype(jnp.int32).sum(-1), num_generations)
  width = prompt_ids.shape[1] + tokens.shape[1]
  k = jnp.arange(width)[None, :]
  valid = k < (prompt_len + lengths)[:, None]
  # Output position k holds the concatenation's entry k + (P - prompt_len): the left padding goes.
  source = jnp.minimum(k + (prompt_ids.shape[1] - prompt_len)[:, None], width - 1)

  def align(prompt_part, completion_part, fill=0):
    both = jnp.concatenate([prompt_part, completion_part], axis=1)
    return jnp.where(valid, jnp.take_along_axis(both, source, axis=1), fill)

  return {"input_ids": align(prompt_ids, tokens, pad_id),
          "attention_mask": valid.astype(jnp.int32),
          "positions": jnp.where(valid, k, 0).astype(jnp.int32),
          "completion_mask": (valid & (k >= prompt_len[:, None])).astype(jnp.int32)}, align


def rows_logprobs(module, params, rows: dict, config: RolloutConfig):
  """log pi(y_t) [R, L] of `module` on rollout rows (`input_ids`, `attention_mask`,
  `positions`, `completion_mask`) at the rollout's scoring temperature, at completion positions
  (0 elsewhere); prefix-shared per group with `config.prefix_sharing`."""
  kwargs = {"chunk_size": config.chunk_size, "temperature": config.scoring_temperature}
  if config.prefix_sharing:
    batch = shared_groups.grouped_batch(rows, {"loss_mask": rows["completion_mask"]},
                                        config.num_generations, shared_row_width(config, rows),
                                        config.groups_per_row)
    return shared_groups.grouped_token_stats(module, params, batch, **kwargs)["logprobs"]
  fields = {**rows, "loss_mask": rows["completion_mask"]}
  return model_token_stats(module, params, fields, **kwargs)["logprobs"]


def shared_row_width(config: RolloutConfig, rows: dict) -> int:
  """W of the shared rows of rollout `rows` [R, L]: `config.shared_width`, or the full width."""
  if config.shared_width is not None:
    return config.shared_width
  prompt_width = rows["input_ids"].shape[1] - config.max_new_tokens
  return shared_groups.full_width(prompt_width, config.num_generations, config.max_new_tokens,
                                  config.groups_per_row)


def frozen_logprobs(module, params, rows: dict, config: RolloutConfig):
  """`rows_logprobs` of a frozen model (a reference), without gradient."""
  return jax.lax.stop_gradient(rows_logprobs(module, params, rows, config))


def logp_difference(logprobs, sampler_logprobs, completion_mask) -> dict:
  """sampling/logp_difference/{mean, max}: |logprobs - sampler_logprobs| over completion tokens
  (0 when there are none)."""
  mask = completion_mask.astype(jnp.float32)
  diff = jnp.abs(logprobs - sampler_logprobs) * mask
  return {"sampling/logp_difference/mean": diff.sum() / jnp.maximum(mask.sum(), 1.0),
          "sampling/logp_difference/max": diff.max()}
