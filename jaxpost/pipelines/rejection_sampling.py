"""Iterated rejection sampling: best-of-N by a verifier or reward model, then SFT, round after round.

Llama 2 (Touvron et al. 2023, §3.2.3), RAFT (Dong et al. 2023) and ReST-EM (Singh et al. 2023):
round t samples N completions y_1..y_N of every prompt x from the current policy π_t at
temperature T_t, scores them r(x, y_i) and keeps

    best         argmax_i r(x, y_i)                             (Llama 2, RAFT)
    top_k        the k highest
    threshold    every y_i with r(x, y_i) >= min_reward
    all_correct  the distinct y_i with r(x, y_i) >= min_reward, at most k  (ReST-EM's E-step)
    pairs        (argmax, argmin) as chosen / rejected when r_max > r_min  (iterative DPO)

(unscorable samples, reward NaN, are never kept). The pool (`this_round`, or `all_rounds`: the
union so far, as Llama 2 did from RLHF-V4 on) is written as prompt/completion SFT rows (or
preference rows) that carry the prompt row's other columns and the reward; π_{t+1} = the `train`
recipe run on it (`jaxpost.train`) from π_t, or from the base model with `restart_from="base"`.

Per-round report (the Llama 2 curve, Fig. 7): the mean over prompts of the max and of the median
reward among the N samples, the rows kept, and the held-out greedy accuracy of the built-in task
after the round (`report.task`). Everything resumes (jaxpost/pipelines/common.py): sampling units
are committed one by one, a round's training resumes from its checkpoints and a finished round is
never redone.

    config = jaxpost.configs.get("rejection_sampling:tiny")
    report = jaxpost.pipelines.rejection_sampling.run(config)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from jaxpost.pipelines import common

log = logging.getLogger("jaxpost.pipelines")
MODES = ("best", "top_k", "threshold", "all_correct", "pairs")
POOLS = ("this_round", "all_rounds")
OWN_COLUMNS = ("prompt", "completion", "chosen", "rejected", "reward", "chosen_reward",
               "rejected_reward", "messages", "responses", "scores", "label")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The pipeline's keys, parsed and checked once (a bad value names its key)."""
  rounds: int
  num_samples: int
  temperatures: tuple
  prompts_per_round: int
  mode: str
  k: int
  min_reward: Optional[float]
  pool: str
  train_after: bool
  restart_from: str

  @classmethod
  def of(cls, config) -> "Settings":
    rounds = int(config.rounds)
    temps = config.temperatures
    temps = [float(config.sampling.temperature)] * rounds if temps is None else list(temps)
    checks = [
        (rounds >= 1, f"config.rounds must be >= 1, got {rounds}"),
        (len(temps) == rounds, f"config.temperatures has {len(temps)} values for "
                               f"config.rounds={rounds}"),
        (all(t >= 0 for t in temps), f"config.temperatures must be >= 0, got {temps}"),
        (config.num_samples >= (2 if config.selection.mode == "pairs" else 1),
         f"config.num_samples={config.num_samples} is too small for selection.mode="
         f"{config.selection.mode!r}"),
        (config.selection.mode in MODES,
         f"config.selection.mode must be one of {MODES}, got {config.selection.mode!r}"),
        (config.pool in POOLS, f"config.pool must be one of {POOLS}, got {config.pool!r}"),
        (config.restart_from in ("", "base"),
         f"config.restart_from must be '' or 'base', got {config.restart_from!r}"),
        (config.selection.mode != "top_k" or config.selection.k >= 1,
         f"config.selection.k must be >= 1 for top_k, got {config.selection.k}"),
        (config.selection.mode != "threshold" or config.selection.min_reward is not None,
         "config.selection.min_reward must be set for selection.mode='threshold'"),
        (config.prompts_per_round >= 0, "config.prompts_per_round must be >= 0"),
        (config.pipeline.batch_size >= 1, "config.pipeline.batch_size must be >= 1"),
    ]
    for ok, message in checks:
      if not ok:
        raise common.PipelineError(message)
    if config.train_after:
      _check_train_recipe(config)
    return cls(rounds, int(config.num_samples), tuple(temps), int(config.prompts_per_round),
               config.selection.mode, int(config.selection.k), config.selection.min_reward,
               config.pool, bool(config.train_after), config.restart_from)


def _check_train_recipe(config):
  from jaxpost.train import algorithms
  pairs = config.selection.mode == "pairs"
  kind = algorithms.get(config.train.algorithm).loader_kind
  if pairs != (kind == "preference"):
    want = "a preference recipe (configs/rejection_sampling.py:pairs)" if pairs else "sft"
    raise common.PipelineError(f"config.selection.mode={config.selection.mode!r} writes "
                               f"{'preference' if pairs else 'SFT'} rows, so config.train must "
                               f"be {want}; it is {config.train.algorithm!r}")


# ----------------------------------------------------------------------------- selection


def select(rewards: np.ndarray, mode: str, k: int = 1, min_reward: Optional[float] = None,
           texts: Optional[Sequence[Sequence[str]]] = None) -> list:
  """What each prompt keeps of its N samples. rewards: [P, N] (NaN = unscorable).

  Returns, per prompt, the kept sample indices (best first) or, for `pairs`, [(chosen, rejected)]
  or []. `texts` [P][N] are needed by `all_correct` (distinct completions only)."""
  out = []
  for p, row in enumerate(np.asarray(rewards, np.float64)):
    valid = np.flatnonzero(~np.isnan(row))
    ranked = valid[np.argsort(-row[valid], kind="stable")]  # best first, ties by sample order
    if mode == "pairs":
      best, worst = (ranked[0], ranked[-1]) if ranked.size else (None, None)
      out.append([(int(best), int(worst))] if ranked.size and row[best] > row[worst] else [])
      continue
    floor = -math.inf if min_reward is None else min_reward
    passing = [int(i) for i in ranked if row[i] >= floor]
    if mode == "best":
      out.append(passing[:1])
    elif mode == "top_k":
      out.append(passing[:k])
    elif mode == "threshold":
      out.append(passing)
    elif mode == "all_correct":
      seen, kept = set(), []
      for i in passing:
        if texts[p][i] not in seen:
          seen.add(texts[p][i])
          kept.append(i)
      out.append(kept[:k] if k > 0 else kept)
    else:
      raise ValueError(f"selection mode must be one of {MODES}, got {mode!r}")
  return out


def reward_curve(rewards: np.ndarray) -> dict:
  """Llama 2's max / median reward among N samples, averaged over the prompts that have a
  scorable sample."""
  rewards = np.asarray(rewards, np.float64)
  scorable = ~np.isnan(rewards).all(axis=1)
  if not scorable.any():
    return {"reward_max": math.nan, "reward_median": math.nan, "reward_mean": math.nan}
  r = rewards[scorable]
  return {"reward_max": float(np.nanmax(r, axis=1).mean()),
          "reward_median": float(np.nanmedian(r, axis=1).mean()),
          "reward_mean": float(np.nanmean(r))}


def kept_rows(row: dict, completions: Sequence, rewards: Sequence[float], picks: list,
              mode: str) -> list[dict]:
  """SFT (or preference) rows of one prompt row from its picked samples."""
  extra = {k: v for k, v in row.items() if k not in OWN_COLUMNS}
  if mode == "pairs":
    return [{**extra, "prompt": row["prompt"], "chosen": completions[c],
             "rejected": completions[r], "chosen_reward": float(rewards[c]),
             "rejected_reward": float(rewards[r])} for c, r in picks]
  return [{**extra, "prompt": row["prompt"], "completion": completions[i],
           "reward": float(rewards[i])} for i in picks]


# ----------------------------------------------------------------------------- the pipeline


class Pipeline:
  """One run over a workdir (module docstring); `run` returns the report."""

  def __init__(self, config):
    from jaxpost.configs import rejection_sampling as recipe
    docs = _docs()  # train.* may be any recipe's keys (sft, dpo, ...)
    common.check_keys(config, recipe.get_config(), docs, "rejection_sampling",
                      [k for k in docs if k.startswith("train.")])
    self.config, self.s = config, Settings.of(config)
    self.workdir = Path(config.workdir)
    self.store = common.UnitStore(self.workdir, config)
    self.budget = common.Budget.of(config)
    self.prompts = common.prompt_rows(config.data)
    self.timings = {"sample": 0.0, "score": 0.0, "train": 0.0, "report": 0.0}
    self._scorer = None
    self.stopped: Optional[str] = None

  # --- helpers

  def _round_prompts(self, r: int) -> list[dict]:
    n = self.s.prompts_per_round or len(self.prompts)
    start = (r * n) % len(self.prompts)
    return [self.prompts[(start + i) % len(self.prompts)] for i in range(min(n, len(self.prompts)))]

  def _scorer_for(self, lm):
    if self._scorer is None:
      self._scorer = common.TextScorer.from_config(self.config, lm.config.vocab_size)
    return self._scorer

  def _base_dir(self) -> str:
    """The base model's checkpoint (a random_init model's saved copy, common.load_generator)."""
    if self.config.model.random_init:
      return str(self.workdir / "base_model")
    return self.config.model.name_or_path

  def _model_of_round(self, r: int) -> Optional[str]:
    """The checkpoint round r samples from: the previous round's export, else the base."""
    if r == 0 or not self.s.train_after:
      return None
    return self.store.info(f"r{r - 1}/train")["model"]

  # --- one round

  def _sample_round(self, r: int, lm) -> bool:
    """Samples, scores and selects round r unit by unit; False when a bound stopped it."""
    units = common.batches(self._round_prompts(r), self.config.pipeline.batch_size, f"r{r}/")
    self.stopped = common.run_units(
        self.store, self.budget, units, lambda uid, batch: self._sample_unit(uid, batch, r, lm),
        f"round {r + 1} sampling", self.config.pipeline.progress_bar)
    return self.stopped is None

  def _sample_unit(self, uid: str, batch: list[dict], r: int, lm):
    n, config = self.s.num_samples, self.config
    start = time.perf_counter()
    out = common.sample(lm, [row["prompt"] for row in batch], n, config.sampling,
                        common.unit_seed(config.seed, uid), config.pipeline.generate_batch_size,
                        temperature=self.s.temperatures[r])
    self.timings["sample"] += time.perf_counter() - start
    start = time.perf_counter()
    prompts = [row["prompt"] for row in batch for _ in range(n)]
    completions = _as_completions(prompts, out.texts)
    token_rows = [p + t for p, t in zip(out.prompt_tokens, out.tokens)]
    rewards = self._scorer_for(lm)(prompts, out.texts, common.columns_of(batch, n), token_rows)
    self.timings["score"] += time.perf_counter() - start
    grid = rewards.reshape(len(batch), n)
    texts = [out.texts[p * n:(p + 1) * n] for p in range(len(batch))]
    picks = select(grid, self.s.mode, self.s.k, self.s.min_reward, texts)
    kept = [row_out for p, row in enumerate(batch)
            for row_out in kept_rows(row, completions[p * n:(p + 1) * n], grid[p], picks[p],
                                     self.s.mode)]
    curve = reward_curve(grid)
    stats = {"prompts": len(batch), "samples": len(batch) * n,
             "unscorable": int(np.isnan(grid).sum()), "kept": len(kept),
             "prompts_without_kept": sum(not p for p in picks)}
    info = {"reward_max_sum": curve["reward_max"] * len(batch),
            "reward_median_sum": curve["reward_median"] * len(batch),
            "reward_sum": float(np.nansum(grid)), "scored": int((~np.isnan(grid)).sum())}
    self.store.commit(uid, kept, stats, info)

  def _pool(self, r: int) -> Path:
    """Writes round r's kept rows and its training pool; returns the pool's path."""
    rounds = range(r + 1) if self.s.pool == "all_rounds" else [r]
    units = [u for q in rounds for u in self.store.units(f"r{q}/u")]
    round_dir = self.workdir / f"round_{r}"
    self.store.export(round_dir / "kept.jsonl", self.store.units(f"r{r}/u"))
    self.store.export(round_dir / "pool.jsonl", units)
    return round_dir / "pool.jsonl"

  def _train(self, r: int, pool: Path) -> str:
    """π_{r+1}: the train recipe on round r's pool; returns the exported HF directory."""
    import jaxpost
    uid = f"r{r}/train"
    if self.store.done(uid):
      return self.store.info(uid)["model"]
    t = self.config.train.copy_and_resolve_references()
    start_from = self._base_dir() if self.s.restart_from == "base" or r == 0 else \
        self.store.info(f"r{r - 1}/train")["model"]
    t.workdir = str(self.workdir / f"round_{r}" / "train")
    t.data.train = str(pool)
    t.model.name_or_path, t.model.random_init, t.model.overrides = start_from, False, {}
    t.export_hf = "hf"
    start = time.perf_counter()
    if common.read_jsonl(pool):
      metrics = jaxpost.train(t)
      if metrics.get("preempted"):
        raise common.PipelineError(f"round {r} training was preempted; rerun to continue")
      model, loss = str(Path(t.workdir) / "hf"), metrics.get("loss")
    else:
      log.warning("round %d kept no rows: the model is not trained this round", r)
      model, loss = start_from, None
    self.timings["train"] += time.perf_counter() - start
    self.store.commit(uid, [], {}, {"model": model, "loss": loss, "start_from": start_from})
    return model

  def _accuracy(self, uid: str, model: Optional[str]) -> Optional[float]:
    """Held-out greedy task accuracy of `model` (None: the base), committed as unit `uid`."""
    from jaxpost.data.heldout import resolve_task
    from jaxpost.train.report import task_accuracy
    task = resolve_task(self.config.report.task, self.config.data.train)
    if not task:
      return None
    if not self.store.done(uid):
      start = time.perf_counter()
      lm = common.load_generator(self.config.model, self.workdir, model, self.config.seed)
      acc = task_accuracy(lm, lm.params, task, self.config.report.examples,
                          self.config.report.max_new_tokens)["task/accuracy"]
      self.timings["report"] += time.perf_counter() - start
      self.store.commit(uid, [], {}, {"accuracy": acc})
    return self.store.info(uid)["accuracy"]

  def _round_report(self, r: int, accuracy) -> dict:
    units = self.store.units(f"r{r}/u")
    info = [self.store.info(u) for u in units]
    stats = self.store.stats(f"r{r}/u")
    prompts = max(stats.get("prompts", 0), 1)
    return {"round": r + 1, "prompts": stats.get("prompts", 0), "samples": stats.get("samples", 0),
            "reward_max": sum(i["reward_max_sum"] for i in info) / prompts,
            "reward_median": sum(i["reward_median_sum"] for i in info) / prompts,
            "reward_mean": sum(i["reward_sum"] for i in info) / max(
                sum(i["scored"] for i in info), 1),
            "kept": stats.get("kept", 0), "accuracy": accuracy}

  # --- the run

  def run(self) -> dict:
    config = self.config
    reports = []
    base_acc = self._accuracy("base/report", None) if self.s.train_after else None
    complete, r = True, 0
    for r in range(self.s.rounds):
      lm = common.load_generator(config.model, self.workdir, self._model_of_round(r), config.seed)
      if not self._sample_round(r, lm):
        complete = False
        break
      pool = self._pool(r)
      model = self._train(r, pool) if self.s.train_after else None
      acc = self._accuracy(f"r{r}/report", model) if self.s.train_after else None
      report = self._round_report(r, acc)
      report["pool"] = len(common.read_jsonl(pool))
      reports.append(report)
      self.stopped = self.budget.stop_reason(0) if r + 1 < self.s.rounds else None
      if self.stopped:  # max_seconds ran out between rounds
        complete = False
        break
    return self._finish(reports, base_acc, complete, r)

  def _finish(self, reports, base_acc, complete, last: int) -> dict:
    """data.jsonl (the pool of the last round reached, as far as it got), table, manifest."""
    rounds = range(last + 1) if self.s.pool == "all_rounds" else [last]
    self.store.export(self.workdir / common.DATA_FILE,
                      [u for q in rounds for u in self.store.units(f"r{q}/u")])
    table = format_rounds(reports, base_acc)
    if table:
      print(table)
    if self.stopped:
      log.warning("stopped early: %s", self.stopped)
    common.write_manifest(self.workdir, self.config, self.config.model.name_or_path, self.store,
                          complete, {**self.timings, "total": self.budget.elapsed()},
                          rounds=reports, base_accuracy=base_acc, stopped=self.stopped)
    return {"complete": complete, "rounds": reports, "base_accuracy": base_acc,
            "data": str(self.workdir / common.DATA_FILE), "stopped": self.stopped}


def _as_completions(prompts: Sequence, texts: Sequence[str]) -> list:
  from jaxpost.algos.scoring import as_completions
  return as_completions(list(prompts), list(texts))


def format_rounds(reports: list[dict], base_acc: Optional[float]) -> str:
  """The per-round table: reward max / median over N, rows kept, pool, held-out accuracy."""
  if not reports:
    return ""
  lines = [f"{'round':>5}  {'reward max':>10}  {'median':>7}  {'kept':>5}  {'pool':>5}  "
           f"{'accuracy':>8}"]
  if base_acc is not None:
    lines.append(f"{'base':>5}  {'':>10}  {'':>7}  {'':>5}  {'':>5}  {base_acc:>8.3f}")
  for rep in reports:
    acc = "" if rep["accuracy"] is None else f"{rep['accuracy']:.3f}"
    lines.append(f"{rep['round']:>5}  {rep['reward_max']:>10.3f}  {rep['reward_median']:>7.3f}  "
                 f"{rep['kept']:>5}  {rep['pool']:>5}  {acc:>8}")
  return "\n".join(lines)


def _docs() -> dict:
  from jaxpost.configs import keys, rejection_sampling as recipe
  return {**recipe.KEYS, **{f"train.{k}": v for k, v in keys.all_docs().items()}}


def run(config) -> dict:
  """Runs (or continues) the pipeline of `config` (configs/rejection_sampling.py); returns
  {"complete", "rounds": per-round reports, "base_accuracy", "data": the final jsonl}."""
  return Pipeline(config).run()
