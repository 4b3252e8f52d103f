"""Evaluators: what the loop measures before training, every `every` steps, and at the end.

`config.evals` names the run's evaluators, each a dict `{type, every, ...}`:

    type      settings (default)                               logs
    loss      batches (eval_batches)                           eval/<metric>: the algorithm's
                                                               loss and metrics, weighted mean
                                                               over `batches` eval batches
    task      task (report.task), examples (report.examples),  task/accuracy, task/concise:
              max_new_tokens (report.max_new_tokens)           greedy held-out task answers
                                                               (train/report.py)
    rollout   batches (eval_batches), num_generations (1),     eval/reward, eval/reward_std,
              temperature (0: greedy), top_k (0), top_p (1),   eval/rewards/<fn>/mean, eval/kl,
              max_new_tokens (rollout.max_new_tokens, else     eval/completions/mean_length,
              report.max_new_tokens)                           eval/completions/eos_rate

`every` (default eval_every; task: 0) is the interval in steps, 0 = only before (eval_at_start)
and after training. An evaluator whose name is not its type logs under its name:
`eval/<name>/<metric>` (`task/<name>/...`), so two of one type never collide. With
`config.evals` empty (the default) the run uses the algorithm's `Algorithm.evals`, each named as
its type with the defaults above: SFT, RM, DPO: loss + task; GRPO, RLOO: rollout + task.

Loss and rollout evaluators read the run's eval data (jaxpost/data/heldout.py `eval_plan`; the
rollout evaluator through a "prompt" loader), the same `batches` batches each time; without eval
data they are skipped. The rollout evaluator samples `num_generations` completions per held-out
prompt from the current policy (fixed keys: the same samples for the same policy), scores them
with the run's reward (algos/scoring.py: `reward.funcs` and the reward model when loaded) and,
when the run has a reference (frozen "ref"), measures

    eval/kl = sum_t m_t (log pi(y_t) - log pi_ref(y_t)) / sum_t m_t    (k1, completion tokens)

at the rollout's scoring temperature. eval/reward and eval/reward_std are the mean and unbiased
std over the scorable completions; eval/completions/eos_rate the fraction that ended with EOS.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from jaxpost.algos import scoring
from jaxpost.algos.rollout import RolloutConfig, frozen_logprobs, sample_rollout
from jaxpost.data import heldout
from jaxpost.losses import kl
from jaxpost.losses.logprobs import DEFAULT_CHUNK_SIZE
from jaxpost.train import algorithms
from jaxpost.train import sharding as sh
from jaxpost.train.metrics import progress
from jaxpost.train.report import task_accuracy
from jaxpost.train.step import make_eval_step

log = logging.getLogger("jaxpost.train")

EVAL_STREAM = 0x5E  # fold_in tag of the rollout evaluator's sampling keys
SETTINGS = {"loss": ("batches",), "task": ("task", "examples", "max_new_tokens"),
            "rollout": ("batches", "num_generations", "temperature", "top_k", "top_p",
                        "max_new_tokens")}
TYPES = tuple(SETTINGS)


@dataclasses.dataclass(frozen=True)
class Spec:
  """One configured evaluator: its name, type, interval and type settings."""
  name: str
  type: str
  every: int
  settings: dict

  def key(self, metric: str) -> str:
    """The logged name of `metric`: eval/<metric>, or eval/<name>/<metric> when named."""
    namespace = "task" if self.type == "task" else "eval"
    if metric.startswith(namespace + "/"):
      metric = metric[len(namespace) + 1:]
    inner = metric if self.name == self.type else f"{self.name}/{metric}"
    return f"{namespace}/{inner}"


def defaults(config, kind: str) -> dict:
  """The settings of a `kind` evaluator from the run's shared keys (module docstring)."""
  report = config.report
  if kind == "loss":
    return {"every": config.eval_every, "batches": config.eval_batches}
  if kind == "task":
    return {"every": 0, "task": report.task, "examples": report.examples,
            "max_new_tokens": report.max_new_tokens}
  rollout = config.get("rollout", None)
  return {"every": config.eval_every, "batches": config.eval_batches, "num_generations": 1,
          "temperature": 0.0, "top_k": 0, "top_p": 1.0,
          "max_new_tokens": rollout.max_new_tokens if rollout is not None
          else report.max_new_tokens}


def specs(config, algorithm) -> list[Spec]:
  """The run's evaluators: `config.evals`, or the algorithm's defaults when it is empty.
  ValueError naming `config.evals.<name>.<key>` for an unknown type or key or a bad value."""
  section = config.get("evals", None)
  if not section:
    return [_spec(config, algorithm, kind, {"type": kind}) for kind in algorithm.evals]
  return [_spec(config, algorithm, name, dict(entry.items() if hasattr(entry, "items")
                                              else {"type": entry}))
          for name, entry in section.items()]


def _spec(config, algorithm, name: str, entry: dict) -> Spec:
  where = f"config.evals.{name}"
  kind = entry.get("type")
  if kind not in TYPES:
    raise ValueError(f"{where}.type={kind!r} is not an evaluator type; choose one of {TYPES}")
  known = ("type", "every") + SETTINGS[kind]
  unknown = sorted(set(entry) - set(known))
  if unknown:
    raise ValueError(f"{where}.{unknown[0]} is not a key of a {kind!r} evaluator; known: "
                     f"{list(known)}")
  values = {**defaults(config, kind), **{k: v for k, v in entry.items() if k != "type"}}
  for key, low in (("every", 0), ("batches", 1), ("examples", 1), ("max_new_tokens", 1),
                   ("num_generations", 1), ("top_k", 0)):
    if key in values and not (isinstance(values[key], int) and values[key] >= low):
      raise ValueError(f"{where}.{key}={values[key]!r} must be an int >= {low}")
  if kind == "rollout" and not (values["temperature"] >= 0 and 0 < values["top_p"] <= 1):
    raise ValueError(f"{where}: temperature={values['temperature']} must be >= 0 and "
                     f"top_p={values['top_p']} in (0, 1]")
  if kind == "loss" and algorithm.loader_kind == "prompt":
    raise ValueError(f"{where}.type='loss': config.algorithm={algorithm.name!r} trains on "
                     f"prompts, which have no loss to evaluate; use a 'rollout' evaluator")
  every = values.pop("every")
  return Spec(name, kind, every, values)


def check(config, algorithm):
  """Up-front check (jaxpost/train/validate.py): the evaluators parse, a task evaluator's task
  exists, and a rollout evaluator has a reward to score with."""
  from jaxpost.data.tasks import reward_fn
  for spec in specs(config, algorithm):
    if spec.type == "task":
      task = heldout.resolve_task(spec.settings["task"], config.data.train)
      if task:
        try:
          reward_fn(task)
        except ValueError as e:
          raise ValueError(f"config.evals.{spec.name}.task={task!r}: {e}") from e
    if spec.type == "rollout":
      section = scoring.reward_section(config)
      if section is None or not (section.get("funcs", "") or section.get("model", "")):
        raise ValueError(f"config.evals.{spec.name}: a 'rollout' evaluator scores with the "
                         f"run's reward; set config.reward.funcs and/or config.reward.model")


# --- the three evaluators: (step, params, frozen) -> {metric: value} ---------------------------

class LossEvaluator:
  """Weighted mean of the loss and metrics over `batches` eval batches (same ones each time)."""

  def __init__(self, spec: Spec, setup: algorithms.StepSetup, loader):
    self.spec, self.setup, self.loader = spec, setup, loader
    self.start = loader.state()
    eval_ctx = dataclasses.replace(setup.ctx, training=False)
    self.step_fn = jax.jit(
        make_eval_step(setup.algorithm, eval_ctx, setup.config.grad_accum, setup.mesh),
        in_shardings=(setup.state_shardings.params, setup.frozen_shardings,
                      setup.batch_sharding), out_shardings=sh.replicated(setup.mesh))

  def __call__(self, step: int, params, frozen) -> dict:
    results = [jax.device_get(self.step_fn(params, frozen, batch))
               for batch in _eval_batches(self.spec, self.setup, self.loader, self.start, step)]
    weights = np.array([w for _, w in results], np.float64)
    total = weights.sum() or 1.0
    metrics = {k: float(sum(w * m[k] for (m, _), w in zip(results, weights)) / total)
               for k in results[0][0]}
    finalize = self.setup.algorithm.finalize_metrics
    return finalize(metrics) if finalize else metrics


class TaskEvaluator:
  """Greedy held-out accuracy on a built-in task (nothing without one, or for a score head)."""

  def __init__(self, spec: Spec, setup: algorithms.StepSetup):
    self.spec, self.policy = spec, setup.policy
    self.task = heldout.resolve_task(spec.settings["task"], setup.config.data.train)

  def __call__(self, step: int, params, frozen) -> dict:
    del step
    if not self.task or self.policy.head != "lm":
      return {}
    return task_accuracy(self.policy, algorithms.applied_policy(params, frozen), self.task,
                         self.spec.settings["examples"], self.spec.settings["max_new_tokens"])


class RolloutEvaluator:
  """Samples completions of held-out prompts, scores them with the run's reward (module
  docstring for the metrics)."""

  def __init__(self, spec: Spec, setup: algorithms.StepSetup, loader):
    self.spec, self.setup, self.loader = spec, setup, loader
    self.start = loader.state()
    cfg, s = setup.config, spec.settings
    self.rollout = RolloutConfig(
        num_generations=s["num_generations"], max_new_tokens=s["max_new_tokens"],
        temperature=float(s["temperature"]), top_k=s["top_k"], top_p=float(s["top_p"]),
        chunk_size=int(cfg.get("logprob_chunk_size", DEFAULT_CHUNK_SIZE)))
    self.reward_model = setup.ctx.modules.get("reward_model")
    self.scorer = scoring.Scorer(scoring.load_functions(cfg), self.reward_model,
                                 setup.policy.tokenizer, loader, s["num_generations"])
    if self.scorer.functions is None and self.reward_model is None:
      raise ValueError(f"config.evals.{spec.name}: no reward to score with (config.reward.funcs "
                       f"is empty and no reward model is loaded by {cfg.algorithm!r})")
    self.key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), EVAL_STREAM)
    self.sample = jax.jit(self._sample)

  def _sample(self, params, frozen, batch, rng):
    """The rollout's host-side fields, reward-model scores and k1 sums (jitted)."""
    setup = self.setup
    rollout = sample_rollout(setup.policy.model, algorithms.applied_policy(params, frozen),
                             batch, rng, self.rollout, setup.mesh)
    mask = rollout.completion_mask.astype(np.float32)
    out = {"input_ids": rollout.input_ids, "completion_mask": rollout.completion_mask,
           "completion_lengths": rollout.completion_lengths, "finished": rollout.finished,
           "tokens": mask.sum()}
    if self.reward_model is not None:
      out["scores"] = self.reward_model.scores(frozen["reward"], rollout.sequences())
    if "ref" in frozen:
      rows = {**rollout.sequences(), "completion_mask": rollout.completion_mask}
      ref_logps = frozen_logprobs(setup.ctx.modules["ref"], frozen["ref"], rows, self.rollout)
      out["kl_sum"] = (kl.k1(rollout.logprobs, ref_logps) * mask).sum()
    return out

  def __call__(self, step: int, params, frozen) -> dict:
    rewards, fn_means, rows, lengths, finished, kl_sum, tokens = [], {}, [], [], [], 0.0, 0.0
    for i, batch in enumerate(_eval_batches(self.spec, self.setup, self.loader, self.start,
                                            step)):
      out = self.sample(params, frozen, batch, jax.random.fold_in(self.key, i))
      total, metrics = self.scorer(out["input_ids"], out["completion_mask"], batch["row"],
                                   out.get("scores"))
      rewards.append(total)
      rows.append(len(total))
      for k, v in metrics.items():
        if k.endswith("/mean"):
          fn_means.setdefault(k, []).append(v)
      lengths.append(scoring.host_array(out["completion_lengths"]))
      finished.append(scoring.host_array(out["finished"]))
      tokens += float(out["tokens"])
      if "kl_sum" in out:
        kl_sum += float(out["kl_sum"])
    record = _reward_stats(np.concatenate(rewards))
    record.update({k: float(np.average(v, weights=rows)) for k, v in fn_means.items()})
    record["completions/mean_length"] = float(np.concatenate(lengths).mean())
    record["completions/eos_rate"] = float(np.concatenate(finished).astype(np.float64).mean())
    if "ref" in frozen:
      record["kl"] = kl_sum / max(tokens, 1.0)
    return record


def _reward_stats(rewards: np.ndarray) -> dict:
  """reward, reward_std: mean and unbiased std of the scorable (non-NaN) rewards."""
  kept = rewards[~np.isnan(rewards)].astype(np.float64)
  if kept.size == 0:
    return {"reward": float("nan"), "reward_std": float("nan")}
  return {"reward": float(kept.mean()),
          "reward_std": float(kept.std(ddof=1)) if kept.size > 1 else 0.0}


def _eval_batches(spec: Spec, setup, loader, start, step: int):
  """The evaluator's `batches` global batches of `loader`, from its start each time."""
  loader.restore(start)
  batches, n = iter(loader), spec.settings["batches"]
  for _ in progress(range(n), n, f"eval @ step {step} ({spec.name})",
                    setup.config.metrics.progress_bar):
    yield sh.global_batch(next(batches), setup.batch_sharding, jax.process_count())


# --- the run's evaluators ----------------------------------------------------------------------

class Evaluations:
  """The run's evaluators with their eval loaders (one per loader kind, built on first use by
  `make_loader(kind)`; `eval_loader`, when given, is the algorithm's kind)."""

  def __init__(self, setup: algorithms.StepSetup, make_loader: Callable[[str], Any],
               eval_loader=None):
    cfg, algorithm = setup.config, setup.algorithm
    self.data = cfg.data
    self.loaders = {algorithm.loader_kind: eval_loader} if eval_loader is not None else {}
    self.description = ("the given eval loader" if eval_loader is not None
                        else heldout.eval_plan(cfg.data)[3])
    self.evaluators, self.latest, self.ran_at = [], {}, {}
    all_specs = specs(cfg, algorithm)
    if any(s.type != "task" for s in all_specs):
      log.info("eval data: %s", self.description)
    for spec in all_specs:
      if spec.type == "task":
        self.evaluators.append((spec, TaskEvaluator(spec, setup)))
        continue
      kind = algorithm.loader_kind if spec.type == "loss" else "prompt"
      loader = self._loader(kind, make_loader)
      if loader is None:
        log.info("evaluator %r (%s) skipped: %s", spec.name, spec.type, self.description)
        continue
      evaluator = LossEvaluator if spec.type == "loss" else RolloutEvaluator
      self.evaluators.append((spec, evaluator(spec, setup, loader)))

  def _loader(self, kind: str, make_loader) -> Optional[Any]:
    """The eval loader of `kind` (None without eval data)."""
    if kind not in self.loaders:
      has_data = heldout.eval_plan(self.data)[0] is not None
      self.loaders[kind] = make_loader(kind) if has_data else None
    return self.loaders[kind]

  def due(self, step: int) -> list[str]:
    """Names of the evaluators whose interval divides `step`."""
    return [spec.name for spec, _ in self.evaluators if spec.every > 0 and step % spec.every == 0]

  def not_run_at(self, step: int) -> list[str]:
    return [spec.name for spec, _ in self.evaluators if self.ran_at.get(spec.name) != step]

  def run(self, step: int, params, frozen, writer, names=None) -> dict:
    """Runs the named evaluators (None: all), writes one record each; returns them merged."""
    merged = {}
    for spec, evaluator in self.evaluators:
      if names is not None and spec.name not in names:
        continue
      start = time.perf_counter()
      record = {spec.key(k): v for k, v in evaluator(step, params, frozen).items()}
      if "batches" in spec.settings:  # the task report logs its own line
        log.info("eval at step %d: %d batches in %.1fs (%s)", step, spec.settings["batches"],
                 time.perf_counter() - start, spec.name)
      if record:
        writer.write(step, record)
      self.latest[spec.name], self.ran_at[spec.name] = record, step
      merged.update(record)
    return merged

  def latest_records(self) -> dict:
    """The last record of every evaluator, merged."""
    return {k: v for record in self.latest.values() for k, v in record.items()}

  def close(self):
    for loader in self.loaders.values():
      if loader is not None:
        getattr(loader, "close", lambda: None)()
