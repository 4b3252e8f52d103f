"""The one training loop. `train(config)` runs, for any registered algorithm:

    distributed init -> config checks (validate.py; nothing loaded yet) -> (a run already at
    max_steps: return `complete`) -> mesh -> policy -> loaders (num_epochs -> max_steps) ->
    frozen trees -> sharded state -> resume from the newest usable checkpoint
    -> repeat: next batch -> [collect] -> the algorithm's step (default: one jitted, donated
               optimiser update; rollout algorithms: one iteration, algorithms.py `make_step`)
               every log_every: fetch device metrics, check them and the last async save,
                                write a record
               every eval_every: eval loss (+ perplexity) on `eval_batches` batches of eval
               data (data.eval; "auto" follows data.train: jaxpost/data/heldout.py)
               every checkpoint.every and at the end: async checkpoint (state, data position)
    -> optional HF export

No host sync happens between log boundaries: step metrics stay on device until the next flush.
A step whose loss, gradient, update or new parameters are non-finite, or whose update is a
blow-up (||update|| > max_update_ratio * ||params||), raises `NonFiniteError` naming the step at
the next flush; flushes precede every checkpoint, so such a state is never saved. SIGTERM
finishes the current step, saves (unless checkpoint.every < 0) and returns `preempted=True`.
Resuming needs the same data stream: a checkpoint saved for other data, seed or batch size
raises `ResumeError` naming what differs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import flax.linen as nn
import jax
import numpy as np

from jaxpost.data import heldout
from jaxpost.data.loader import make_loader
from jaxpost.models import lora
from jaxpost.models.lora import LoraSpec
from jaxpost.train import algorithms
from jaxpost.train import sharding as sh
from jaxpost.train.checkpoint import Checkpointer, changed_inputs, checkpoint_dir
from jaxpost.train.metrics import MetricsWriter, peak_flops_per_device, progress, train_flops
from jaxpost.train.optim import build_optimizer
from jaxpost.train.state import abstract_like, create_train_state, load_sharded
from jaxpost.train.report import format_report, task_report
from jaxpost.train.step import make_eval_step, train_step
from jaxpost.train.validate import check as check_config

log = logging.getLogger("jaxpost.train")


class NonFiniteError(FloatingPointError):
  """A step went non-finite or blew up; raised at the next log or checkpoint boundary."""


class ResumeError(ValueError):
  """The workdir's checkpoint cannot continue this run (other data, seed or batch shape)."""


def train(config, train_loader=None, eval_loader=None) -> dict:
  """Trains per `config` (see configs/base.py); returns the final metrics (last logged train
  record, `eval/*` of the final eval, `step`, `preempted`: stopped by SIGTERM, `complete`: the
  workdir already held a checkpoint at max_steps, so nothing ran). Loaders default to
  `data.train` / `data.eval`."""
  initialize_distributed(config.distributed)
  check_config(config, jax.device_count(), jax.process_count(), own_data=train_loader is None)
  done = completed_step(config)
  if done is not None:
    log.info("%s is complete: checkpoint at step %d >= max_steps=%d; nothing to do",
             config.workdir, done, config.max_steps)
    return {"step": done, "complete": True, "preempted": False}
  algorithm = algorithms.get(config.algorithm)
  mesh = sh.build_mesh(config.mesh)
  rules = sh.rules_of(config.mesh)
  log.info("mesh %s over %d devices in %d processes", dict(mesh.shape), mesh.size,
           jax.process_count())
  trainer = Trainer(config, algorithm, mesh, rules, train_loader, eval_loader)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # for activation sharding constraints
    return trainer.run()


def initialize_distributed(dist_cfg):
  """`jax.distributed.initialize` when `config.distributed.initialize` (coordinator, process
  count and id may be left empty on TPU/SLURM, where they are discovered)."""
  if dist_cfg.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", dist_cfg.cpu_collectives)
  if dist_cfg.initialize and not jax.distributed.is_initialized():
    jax.distributed.initialize(
        coordinator_address=dist_cfg.coordinator_address or None,
        num_processes=dist_cfg.num_processes if dist_cfg.num_processes > 0 else None,
        process_id=dist_cfg.process_id if dist_cfg.process_id >= 0 else None)


def completed_step(config) -> Optional[int]:
  """The step of the workdir's latest checkpoint if it is >= max_steps (meta readable), else
  None."""
  if not checkpoint_dir(config.workdir).is_dir():
    return None
  ckpt = Checkpointer(config.workdir, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None or step < config.max_steps:
      return None
    ckpt.restore_meta(step)
    return step
  except Exception:  # pylint: disable=broad-except  # unreadable: the resume path falls back
    return None
  finally:
    ckpt.close()


class Trainer:
  """Setup in `__init__`, the loop in `run`. Use `train(config)`."""

  def __init__(self, config, algorithm, mesh, rules, train_loader=None, eval_loader=None):
    self.config, self.algorithm, self.mesh = config, algorithm, mesh
    load = functools.partial(load_sharded, config.model, mesh, rules)
    self.lora = LoraSpec.from_config(config)
    self.policy = load(head=algorithm.head, seed=config.seed, lora=self.lora)
    self._build_loaders(train_loader, eval_loader)
    self.config = config = self._steps_from_epochs(config)
    trainable, base = self._split_trainable()
    self.frozen, modules = algorithm.prepare_frozen(algorithms.SetupContext(
        config, dataclasses.replace(self.policy, params=base), load, self.lora is not None,
        self.loader))
    if self.lora is not None:
      self.frozen[algorithms.LORA_BASE] = base
    tx, schedule = build_optimizer(config.optimizer,
                                   config.max_steps * algorithm.updates_per_step(config))
    self.state, state_sh = create_train_state(trainable, tx, config.seed, mesh,
                                              algorithm.init_extra(config))
    self.policy = dataclasses.replace(self.policy, params=None)  # donated into the state
    self.ctx = algorithms.LossContext(self.policy.model, config, True, modules)
    self._jit_steps(tx, schedule, state_sh)
    self.ckpt = Checkpointer(config.workdir, config.checkpoint.keep, config.checkpoint.async_save)
    self.start_step = self._maybe_resume(state_sh)
    self.stop_requested = False
    self.pending = []  # (step, device metrics, flops, timed) since the last flush
    self.last, self.last_eval = {}, {}
    self.num_tokens, self.compile_time = 0.0, None

  # ------------------------------------------------------------------------------- setup

  def _split_trainable(self):
    """(trainable params, frozen base or None): everything, or with LoRA the adapters."""
    if self.lora is None:
      return self.policy.params, self.policy.params
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 2)
    trainable, base = lora.split_trainable(self.policy.params, self.lora, rng)
    log.info(lora.describe(base, trainable))
    return trainable, base

  def _jit_steps(self, tx, schedule, state_sh):
    """The loop step (the algorithm's `make_step`, default: the jitted gradient step with the
    state donated) and the eval step, with explicit in/out shardings."""
    cfg, mesh = self.config, self.mesh
    frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen)
    self._batch_sharding = sh.batch_sharding(mesh)
    rep = sh.replicated(mesh)
    setup = algorithms.StepSetup(cfg, self.algorithm, self.ctx, tx, schedule, mesh, state_sh,
                                 frozen_sh, self._batch_sharding, self.policy, self.loader)
    self.train_step = (self.algorithm.make_step or train_step)(setup)
    eval_ctx = dataclasses.replace(self.ctx, training=False)
    self.eval_step = jax.jit(
        make_eval_step(self.algorithm, eval_ctx, cfg.grad_accum, mesh),
        in_shardings=(state_sh.params, frozen_sh, self._batch_sharding), out_shardings=rep)

  def _build_loaders(self, train_loader, eval_loader):
    cfg, kind = self.config, self.algorithm.loader_kind
    make = lambda split: make_loader(cfg, self.policy.tokenizer, self.policy.config.vocab_size,
                                     kind, split, jax.process_index(), jax.process_count())
    self.loader = train_loader or make("train")
    self.eval_description = "the given eval loader"
    if eval_loader is None and "loss" in self.algorithm.evals:
      sources, _, _, self.eval_description = heldout.eval_plan(cfg.data)
      eval_loader = make("eval") if sources is not None else None
    log.info("eval data: %s", self.eval_description)
    self.eval_loader = eval_loader
    self._eval_start = eval_loader.state() if eval_loader is not None else None

  def _steps_from_epochs(self, config):
    """`config`, or with num_epochs > 0 a copy whose max_steps covers that many epochs."""
    epochs = config.get("num_epochs", 0.0)
    if not epochs:
      return config
    if not hasattr(self.loader, "steps_for"):
      raise ValueError(f"config.num_epochs={epochs}: the training loader "
                       f"({type(self.loader).__name__}) has no epoch size; set config.max_steps")
    config = config.copy_and_resolve_references()
    config.max_steps = self.loader.steps_for(epochs)
    log.info("num_epochs=%g: %d steps of %d rows", epochs, config.max_steps, config.batch_size)
    return config

  def _maybe_resume(self, state_sh) -> int:
    restored = self.ckpt.restore_newest(abstract_like(self.state, state_sh))
    if restored is None:
      return 0
    step, self.state, meta = restored
    self._check_same_stream(step, meta)
    self.loader.restore(meta["data"])
    log.info("Resumed from %s at step %d (%d optimiser updates)", self.ckpt.directory, step,
             int(jax.device_get(self.state.step)))
    return step

  def _check_same_stream(self, step: int, meta: dict):
    """`ResumeError` naming what differs when the checkpoint's data position was saved for a
    loader with another fingerprint (data, order or batch shape)."""
    current = getattr(self.loader, "fingerprint", None)
    if current is None or meta["data"].get("fingerprint") == current:
      return
    changes = changed_inputs(meta.get("data_inputs"), self.loader.fingerprint_inputs) or [
        f"fingerprint {meta['data'].get('fingerprint')} -> {current}"]
    raise ResumeError(
        f"{self.config.workdir} holds a checkpoint (step {step}) of a run with other training "
        f"data or batch shape, so it cannot resume with this config; saved -> now: "
        f"{'; '.join(changes)}. Use a new workdir (--config.workdir=...) for these settings, "
        f"or the old settings to resume.")

  def _global(self, batch: dict) -> dict:
    return sh.global_batch(batch, self._batch_sharding, jax.process_count())

  def _batches(self):
    """Loader batches, each through the algorithm's collect phase when it has one."""
    for batch in self.loader:
      if self.algorithm.collect is not None:
        batch = self.algorithm.collect(batch, self.frozen, self.ctx)
      yield batch

  # ------------------------------------------------------------------------------- loop

  def run(self) -> dict:
    cfg = self.config
    step = self.start_step
    if step >= cfg.max_steps > 0:  # e.g. num_epochs decided max_steps after the early check
      log.info("%s is complete at step %d; nothing to do", cfg.workdir, step)
      return {"step": step, "complete": True, "preempted": False}
    self.writer = MetricsWriter(cfg, Path(cfg.workdir), cfg.max_steps, step)
    previous_handler = self._install_sigterm()
    evals = {}
    try:
      if cfg.eval_at_start and step == 0:
        evals["before"] = self._evaluate_all(step)
      self.writer.start_progress()
      self.window_start = time.perf_counter()
      batches = self._batches()
      while step < cfg.max_steps and not self.stop_requested:
        batch = next(batches)
        flops = train_flops(self.policy.config, batch, weight_grads=self.lora is None)
        self.state, metrics = self.train_step(self.state, self.frozen, self._global(batch))
        step += 1
        first = step == self.start_step + 1
        if first:  # one sync: the first step's time is mostly compilation
          jax.block_until_ready(metrics)
          self.compile_time = time.perf_counter() - self.window_start
          self.window_start = time.perf_counter()
        self.pending.append((step, metrics, flops, not first))
        self._boundaries(step)
      self._flush(step)
      self._save(step)
      if not self.stop_requested:
        evaluated = cfg.eval_every and step % cfg.eval_every == 0
        evals["after"] = self._evaluate_all(step, loss=not evaluated)
        if cfg.export_hf:
          self._export(Path(cfg.workdir) / cfg.export_hf)
    finally:
      if previous_handler is not None:
        signal.signal(signal.SIGTERM, previous_handler)
      self.writer.close()
      for loader in (self.loader, self.eval_loader):
        getattr(loader, "close", lambda: None)()
      self.ckpt.close()
    return self._summary(step, evals)

  def _boundaries(self, step: int):
    cfg = self.config
    every = lambda n: n > 0 and step % n == 0
    save = every(cfg.checkpoint.every)
    evaluate = self.eval_loader is not None and every(cfg.eval_every)
    if every(cfg.log_every) or save or evaluate or self.stop_requested:
      self._flush(step)
    if evaluate:
      self.last_eval = self._evaluate(step)
    if save or self.stop_requested:
      self._save(step)
    if self.stop_requested:
      saved = "saved a checkpoint" if self._checkpointing(step) else (
          "no checkpoint saved (checkpoint.every < 0), a rerun starts over")
      log.warning("SIGTERM at step %d: %s; stopping", step, saved)

  def _flush(self, step: int):
    """Fetches pending metrics, stops on a non-finite step, writes the averaged record."""
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m, _, _ in self.pending])
    elapsed = time.perf_counter() - self.window_start
    self.ckpt.check()
    for (s, _, _, _), m in zip(self.pending, fetched):
      self._check_step(s, m)
    record = {k: float(np.mean([m[k] for m in fetched]))
              for k in fetched[0] if k not in ("finite", "tokens", "flops")}
    record["learning_rate"] = float(fetched[-1]["learning_rate"])
    timed = [(m, float(m.get("flops", f))) for (_, _, f, t), m in zip(self.pending, fetched)
             if t]
    if timed:
      record.update(self._throughput(timed, elapsed))
    if self.compile_time is not None:
      record["compile_time"], self.compile_time = self.compile_time, None
    self.num_tokens += sum(float(m["tokens"]) for m in fetched)
    record["num_tokens"] = self.num_tokens
    if hasattr(self.loader, "epoch"):
      record["epoch"] = self.loader.epoch
    if self.algorithm.finalize_metrics:
      record = self.algorithm.finalize_metrics(record)
    self.writer.write(step, record)
    self.writer.advance(len(self.pending))
    self.last = record
    self.pending = []
    self.window_start = time.perf_counter()

  def _check_step(self, step: int, m: dict):
    """`NonFiniteError` if step `step` went non-finite or its update blew up."""
    ratio = self.config.get("max_update_ratio", 0.0)
    exploded = ratio > 0 and m["update_norm"] > ratio * m["param_norm"]
    if m["finite"] and not exploded:
      return
    what = (f"update_norm {m['update_norm']:.4g} > max_update_ratio={ratio} x param_norm "
            f"{m['param_norm']:.4g}" if m["finite"] else "non-finite values")
    raise NonFiniteError(
        f"Training diverged at step {step} ({what}; loss={m['loss']}, grad_norm="
        f"{m['grad_norm']}, update_norm={m['update_norm']}, param_norm={m['param_norm']}); "
        f"stopping without checkpointing it. Last checkpoint: step {self.ckpt.latest_step()} in "
        f"{self.ckpt.directory}")

  def _throughput(self, timed, elapsed: float) -> dict:
    """step_time, tokens_per_sec (real tokens) and MFU over the timed steps of a window."""
    tokens = sum(float(m["tokens"]) for m, _ in timed)
    flops = sum(f for _, f in timed)
    peak = jax.device_count() * peak_flops_per_device(self.config.metrics.cpu_peak_flops)
    return {"step_time": elapsed / len(timed), "tokens_per_sec": tokens / elapsed,
            "mfu": flops / elapsed / peak}

  def _evaluate(self, step: int) -> dict:
    """Weighted mean of the loss and metrics over `eval_batches` eval batches (same batches each
    time), logged as eval/<name>."""
    self.eval_loader.restore(self._eval_start)
    batches, n, start = iter(self.eval_loader), self.config.eval_batches, time.perf_counter()
    results = [jax.device_get(self.eval_step(self.state.params, self.frozen,
                                             self._global(next(batches))))
               for _ in progress(range(n), n, f"eval @ step {step}",
                                 self.config.metrics.progress_bar)]
    log.info("eval at step %d: %d batches in %.1fs", step, n, time.perf_counter() - start)
    weights = np.array([w for _, w in results], np.float64)
    total = weights.sum() or 1.0
    metrics = {k: float(sum(w * m[k] for (m, _), w in zip(results, weights)) / total)
               for k in results[0][0]}
    if self.algorithm.finalize_metrics:
      metrics = self.algorithm.finalize_metrics(metrics)
    record = {f"eval/{k}": v for k, v in metrics.items()}
    self.writer.write(step, record)
    self.window_start = time.perf_counter()
    return record

  def _evaluate_all(self, step: int, loss: bool = True) -> dict:
    """Eval loss/metrics (when there is eval data) and the held-out task report."""
    record = self._evaluate(step) if loss and self.eval_loader is not None else {}
    params = algorithms.applied_params(self.state.params, self.frozen)
    task = task_report(self.policy, params, self.config)
    if task:
      self.writer.write(step, task)
    return {**record, **task}

  def _checkpointing(self, step: int) -> bool:
    return self.config.checkpoint.every >= 0 and step > 0

  def _save(self, step: int):
    """Saves unless checkpointing is off (checkpoint.every < 0); always after a flush."""
    if self._checkpointing(step):
      self.ckpt.save(step, self.state, self.loader.state(), self.config,
                     getattr(self.loader, "fingerprint_inputs", None))

  def _install_sigterm(self):
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
      return None

    def handler(signum, frame):
      del signum, frame
      self.stop_requested = True

    return signal.signal(signal.SIGTERM, handler)

  def _export(self, out_dir: Path):
    from jaxpost.train.export import export_trained
    start = time.perf_counter()
    log.info("export: writing the trained model to %s", out_dir)
    export_trained(self.policy, self.state.params, self.frozen, self.mesh, out_dir, self.lora)
    log.info("export: done in %.1fs", time.perf_counter() - start)

  def _summary(self, step: int, evals: dict) -> dict:
    out = {"step": step, **self.last, **self.last_eval}
    out.update(evals.get("after", {}))
    if "before" in evals:
      out.update({f"{k}_before": v for k, v in evals["before"].items()})
      table = format_report(evals["before"], out, step)
      if jax.process_index() == 0 and not self.stop_requested:  # preempted: no "after" yet
        print(f"Before/after training (eval: {self.eval_description}):\n{table}" if table
              else f"No before/after table: {self.eval_description}")
    out["preempted"], out["complete"] = self.stop_requested, False
    return out
