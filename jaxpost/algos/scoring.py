"""Rewards of a rollout: Python reward functions on the decoded text, and/or a reward model.

    config.reward.funcs     reward functions (jaxpost/rewards.py: builtin:<task>, file.py:fn,
                            module:fn), weighted by config.reward.weights
    config.reward.model     a head="score" checkpoint (e.g. runs/rm/hf from `configs/rm.py`),
                            scored in-graph on the rollout's token rows (same tokenizer as the
                            policy), weighted by config.reward.model_weight

The reward of completion i is (TRL 1.16 `GRPOTrainer`, where a reward model is one more reward
function):

    R_i = Σ_f w_f r_fi  (+ w_model · score_i)

with a None from a function counting 0, and R_i = NaN (unscorable: excluded from the group
statistics, advantage 0) when every function returned None and there is no reward model.

The host side (`score_texts`) decodes the completions of ALL rows on every process (gathered
with `process_allgather`, so multi-process runs score identically everywhere) and calls the
functions with the prompt rows behind the batch (`loader.example(row)`: the prompt, and every
other column of the row as a keyword list, e.g. `answer`). A conversational prompt (a list of
messages) gets conversational completions `[{"role": "assistant", "content": text}]`, as in TRL.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxpost import rewards as reward_lib
from jaxpost.models.heads import last_token_scores

MODEL_NAME = "reward_model"  # metric name of the reward model: rewards/reward_model/mean


def reward_section(config):
  return config.get("reward", None)


def host_array(x) -> np.ndarray:
  """The whole (global) array on this host: gathered over processes when it spans several."""
  if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def completion_token_lists(input_ids, completion_mask) -> list[list[int]]:
  """The completion tokens of every row (the masked positions, EOS included)."""
  ids, mask = host_array(input_ids), host_array(completion_mask).astype(bool)
  return [row[keep].tolist() for row, keep in zip(ids, mask)]


def prompt_inputs(loader, rows, num_generations: int) -> tuple[list, dict]:
  """(prompts, columns) for the R = B * G completions of prompt rows `rows` [B] (each repeated
  G times): the loader's normalised example of each row, its `prompt` and its other columns."""
  examples = [loader.example(int(r)) for r in host_array(rows)]
  repeated = [ex for ex in examples for _ in range(num_generations)]
  keys = [k for k in repeated[0] if k != "prompt"]
  missing = [(k, i) for i, ex in enumerate(examples) for k in keys if k not in ex]
  if missing:
    key, i = missing[0]
    raise reward_lib.RewardError(f"reward: prompt row {int(host_array(rows)[i])} has no column "
                                 f"{key!r}, which other rows of the batch have")
  return [ex["prompt"] for ex in repeated], {k: [ex[k] for ex in repeated] for k in keys}


def as_completions(prompts: list, texts: list[str]) -> list:
  """Texts as TRL passes completions: strings, or assistant messages for chat prompts."""
  return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
          for p, t in zip(prompts, texts)]


@dataclasses.dataclass(frozen=True)
class RewardModel:
  """A scalar-head model scored in-graph: score of the last real token of each row."""
  module: Any
  weight: float = 1.0

  def scores(self, params, rows: dict):
    out = self.module.apply({"params": params}, rows["input_ids"], rows["attention_mask"],
                            rows.get("positions"))
    return jax.lax.stop_gradient(last_token_scores(out, rows["attention_mask"]))


@dataclasses.dataclass
class Scorer:
  """Turns a rollout into rewards [R] (float32, NaN = unscorable) and TRL's reward metrics."""
  functions: Optional[reward_lib.RewardFunctions]
  model: Optional[RewardModel]
  tokenizer: Any
  loader: Any
  num_generations: int

  def __call__(self, input_ids, completion_mask, rows, model_scores=None):
    """`model_scores` [R]: the reward model's scores of the rows (device or host), if any."""
    total = None
    metrics = {}
    if self.functions is not None:
      prompts, columns = prompt_inputs(self.loader, rows, self.num_generations)
      tokens = completion_token_lists(input_ids, completion_mask)
      texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
      scores = self.functions(prompts, as_completions(prompts, texts), columns)
      total, metrics = scores.total.astype(np.float64), dict(scores.metrics)
    if self.model is not None:
      score = host_array(model_scores).astype(np.float64)
      metrics[f"rewards/{MODEL_NAME}/mean"] = float(score.mean())
      metrics[f"rewards/{MODEL_NAME}/std"] = float(score.std(ddof=1)) if score.size > 1 else 0.0
      weighted = self.model.weight * score
      total = weighted if total is None else np.where(np.isnan(total), 0.0, total) + weighted
    return total.astype(np.float32), metrics


def load_reward_model(setup_ctx, policy_vocab: int):
  """(frozen params, RewardModel) of `config.reward.model`, or (None, None) without one."""
  section = reward_section(setup_ctx.config)
  name = section.get("model", "") if section is not None else ""
  if not name:
    return None, None
  loaded = setup_ctx.load(name_or_path=name, head="score")
  if loaded.config.vocab_size != policy_vocab:
    raise ValueError(f"config.reward.model={name!r} has a vocabulary of "
                     f"{loaded.config.vocab_size} tokens, the policy {policy_vocab}: the reward "
                     f"model scores the policy's token rows, so it needs the same tokenizer")
  params = jax.tree.map(lambda p: p.astype(jnp.dtype(loaded.config.dtype))
                        if jnp.issubdtype(p.dtype, jnp.floating) else p, loaded.params)
  return params, RewardModel(loaded.model, float(section.get("model_weight", 1.0)))


def load_functions(config) -> Optional[reward_lib.RewardFunctions]:
  """The run's reward functions (`reward.funcs`, `reward.weights`), or None when there are none."""
  section = reward_section(config)
  funcs = section.get("funcs", "") if section is not None else ""
  if not funcs:
    return None
  return reward_lib.load(funcs, section.get("weights", None))


def check_reward_keys(config):
  """Up-front check: some reward is configured and the functions load (Algorithm.check_config)."""
  section = reward_section(config)
  if section is None or not (section.get("funcs", "") or section.get("model", "")):
    raise ValueError(f"config.algorithm={config.algorithm!r} needs a reward: set "
                     f"config.{reward_lib.FUNCS_KEY} (e.g. 'builtin:arithmetic' or "
                     f"'my_rewards.py:fn') and/or config.reward.model (a reward-model directory)")
  load_functions(config)
