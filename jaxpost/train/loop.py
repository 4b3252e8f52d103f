"""The one training loop. `train(config)` runs, for any registered algorithm:

    distributed init -> config checks (validate.py; nothing loaded yet) -> (a run already at
    max_steps: return `complete`) -> the algorithm's `prepare_config` -> mesh -> policy -> loaders (num_epochs -> max_steps) ->
    frozen trees -> sharded state -> resume from the newest usable checkpoint
    -> repeat: next batch -> [collect] -> the algorithm's step (default: one jitted, donated
               optimiser update; rollout algorithms: one iteration, algorithms.py `make_step`)
               every log_every: fetch device metrics, check them and the last async save,
                                write a record (train/window.py)
               every evaluator's `every`: its evaluation (train/evals.py: loss on eval data,
               held-out task accuracy, rollouts of held-out prompts)
               every checkpoint.every and at the end: async checkpoint (state, data position)
    -> every evaluator once more at the end (eval_at_start: also before the first step)
    -> optional HF export -> workdir/curves.png (metrics.plot; jaxpost/plot.py)

No host sync happens between log boundaries: step metrics stay on device until the next flush.
A step whose loss, gradient, update or new parameters are non-finite, or whose update is a
blow-up (||update|| > max_update_ratio * ||params||), raises `NonFiniteError` naming the step at
the next flush; flushes precede every checkpoint and evaluation, so such a state is never
saved. SIGTERM finishes the current step, saves (unless checkpoint.every < 0) and returns
`preempted=True`.
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

from jaxpost.data import heldout
from jaxpost.data.loader import make_loader
from jaxpost.models import lora
from jaxpost.models.lora import LoraSpec
from jaxpost.plot import write_run_curves
from jaxpost.train import algorithms
from jaxpost.train import sharding as sh
from jaxpost.train.checkpoint import Checkpointer, changed_inputs, checkpoint_dir
from jaxpost.train.evals import Evaluations
from jaxpost.train.host_memory import keep_freed_memory
from jaxpost.train.metrics import MetricsWriter, train_flops
from jaxpost.train.optim import build_optimizer, member_optimizer
from jaxpost.train.state import abstract_like, create_train_state, load_sharded
from jaxpost.train.report import before_after
from jaxpost.train.step import train_step
from jaxpost.train.validate import check as check_config
from jaxpost.train.window import MetricWindow, NonFiniteError

log = logging.getLogger("jaxpost.train")
__all__ = ["NonFiniteError", "ResumeError", "Trainer", "train"]


class ResumeError(ValueError):
  """The workdir's checkpoint cannot continue this run (other data, seed or batch shape)."""


def train(config, train_loader=None, eval_loader=None) -> dict:
  """Trains per `config` (see configs/base.py); returns the final metrics (last logged train
  record, the final record of every evaluator (`eval/*`, `task/*`, and `<key>_before` of the
  step-0 ones), `step`, `preempted`: stopped by SIGTERM, `complete`: the workdir already held a
  checkpoint at max_steps, so nothing ran). Loaders default to
  `data.train` / `data.eval`."""
  if config.get("keep_freed_memory", True):
    keep_freed_memory()  # before JAX's CPU client exists (train/host_memory.py)
  initialize_distributed(config.distributed)
  check_config(config, jax.device_count(), jax.process_count(), own_data=train_loader is None)
  done = completed_step(config)
  if done is not None:
    log.info("%s is complete: checkpoint at step %d >= max_steps=%d; nothing to do",
             config.workdir, done, config.max_steps)
    return {"step": done, "complete": True, "preempted": False}
  algorithm = algorithms.get(config.algorithm)
  if algorithm.prepare_config is not None:
    config = algorithm.prepare_config(config)
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
    self.loader = train_loader or self._make_loader(algorithm.loader_kind, "train")
    self.config = config = self._steps_from_epochs(config)
    trainable, base = self._split_trainable()
    setup_ctx = algorithms.SetupContext(config, dataclasses.replace(self.policy, params=base),
                                        load, self.lora is not None, self.loader)
    self.frozen, modules = algorithm.prepare_frozen(setup_ctx)
    if self.lora is not None:
      self.frozen[algorithms.LORA_BASE] = base
    updates = config.max_steps * algorithm.updates_per_step(config)
    tx, schedule = build_optimizer(config.optimizer, updates)
    if algorithm.members is not None:
      trainable, tx, modules = self._with_members(algorithm.members(setup_ctx), trainable, tx,
                                                  modules, updates)
    self.state, state_sh = create_train_state(trainable, tx, config.seed, mesh,
                                              algorithm.init_extra(config))
    self.policy = dataclasses.replace(self.policy, params=None)  # donated into the state
    self.ctx = algorithms.LossContext(self.policy.model, config, True, modules)
    setup = self._step_setup(tx, schedule, state_sh)
    self.train_step = (algorithm.make_step or train_step)(setup)
    self.evaluations = Evaluations(setup, lambda kind: self._make_loader(kind, "eval"),
                                   eval_loader)
    self.ckpt = Checkpointer(config.workdir, config.checkpoint.keep, config.checkpoint.async_save)
    self.start_step = self._maybe_resume(state_sh)
    self.stop_requested = False
    self.last_eval = {}

  # ------------------------------------------------------------------------------- setup

  def _split_trainable(self):
    """(trainable params, frozen base or None): everything, or with LoRA the adapters."""
    if self.lora is None:
      return self.policy.params, self.policy.params
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 2)
    trainable, base = lora.split_trainable(self.policy.params, self.lora, rng)
    log.info(lora.describe(base, trainable))
    return trainable, base

  def _with_members(self, members: dict, trainable, tx, modules: dict, updates: int):
    """(trainable {"policy", *members}, one multi_transform optimiser, modules + the members')
    for an algorithm with other trainable models (`Algorithm.members`)."""
    transforms = {algorithms.POLICY: tx}
    for name, member in members.items():
      transforms[name] = build_optimizer(member.optimizer, updates)[0]
      log.info("trainable member %r: learning rate %g", name, member.optimizer.learning_rate)
    trainable = {algorithms.POLICY: trainable, **{k: m.params for k, m in members.items()}}
    return (trainable, member_optimizer(transforms),
            {**modules, **{k: m.module for k, m in members.items()}})

  def _step_setup(self, tx, schedule, state_sh) -> algorithms.StepSetup:
    """What the loop step (the algorithm's `make_step`, default: the jitted gradient step with
    the state donated) and the evaluators are built from: explicit shardings included."""
    frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen)
    self._batch_sharding = sh.batch_sharding(self.mesh)
    return algorithms.StepSetup(self.config, self.algorithm, self.ctx, tx, schedule, self.mesh,
                                state_sh, frozen_sh, self._batch_sharding, self.policy,
                                self.loader)

  def _make_loader(self, kind: str, split: str):
    return make_loader(self.config, self.policy.tokenizer, self.policy.config.vocab_size, kind,
                       split, jax.process_index(), jax.process_count())

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
      self.window = MetricWindow(cfg, self.writer, self.ckpt, self.loader,
                                 self.algorithm.finalize_metrics)
      if cfg.eval_at_start and step == 0:
        evals["before"] = self._evaluate(step)
      self.writer.start_progress()
      self.window.restart()
      batches = self._batches()
      while step < cfg.max_steps and not self.stop_requested:
        batch = next(batches)
        flops = train_flops(self.policy.config, batch, weight_grads=self.lora is None)
        self.state, metrics = self.train_step(self.state, self.frozen, self._global(batch))
        step += 1
        # the first step's time is mostly compilation: one sync, timed apart
        self.window.add(step, metrics, flops, first=step == self.start_step + 1)
        self._boundaries(step)
      self.window.flush(step)
      self._save(step)
      if not self.stop_requested:
        self._evaluate(step, self.evaluations.not_run_at(step))
        evals["after"] = self.evaluations.latest_records()
        if cfg.export_hf:
          self._export(Path(cfg.workdir) / cfg.export_hf)
    finally:
      if previous_handler is not None:
        signal.signal(signal.SIGTERM, previous_handler)
      self.writer.close()
      getattr(self.loader, "close", lambda: None)()
      self.evaluations.close()
      self.ckpt.close()
    if cfg.metrics.plot and not self.stop_requested and jax.process_index() == 0:
      write_run_curves(cfg.workdir)  # after everything is saved; a failure only warns
    return self._summary(step, evals)

  def _boundaries(self, step: int):
    cfg = self.config
    every = lambda n: n > 0 and step % n == 0
    save = every(cfg.checkpoint.every)
    due = self.evaluations.due(step)
    if every(cfg.log_every) or save or due or self.stop_requested:
      self.window.flush(step)
    if due:
      self.last_eval.update(self._evaluate(step, due))
    if save or self.stop_requested:
      self._save(step)
    if self.stop_requested:
      saved = "saved a checkpoint" if self._checkpointing(step) else (
          "no checkpoint saved (checkpoint.every < 0), a rerun starts over")
      log.warning("SIGTERM at step %d: %s; stopping", step, saved)

  def _evaluate(self, step: int, names=None) -> dict:
    """The named evaluators (None: all) on the current policy; their time is not training's."""
    record = self.evaluations.run(step, self.state.params, self.frozen, self.writer, names)
    self.window.restart()
    return record

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
    out = {"step": step, **self.window.last, **self.last_eval}
    out.update(evals.get("after", {}))
    if "before" in evals:
      out.update({f"{k}_before": v for k, v in evals["before"].items()})
      if jax.process_index() == 0 and not self.stop_requested:  # preempted: no "after" yet
        print(before_after(evals["before"], out, step, self.evaluations.description))
    out["preempted"], out["complete"] = self.stop_requested, False
    return out
