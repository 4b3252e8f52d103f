"""Orbax checkpoints in `workdir/checkpoints/<step>/`: the train state and a JSON `meta` item.

    state: TrainState(step, params, opt_state, rng)   sharded arrays, restored onto the mesh
    meta:  {"step", "data": loader.state(), "data_inputs": what the loader position depends on
            (loader.fingerprint_inputs, when the loader has them), "config": the run as JSON}

Saves are asynchronous (the step loop continues while the arrays are written) and atomic: Orbax
writes into a temporary directory and renames it when complete, so a process killed mid-save
leaves the previous checkpoint as the latest usable one (the partial directory is ignored and
cleaned up on the next start). At most `keep` checkpoints are kept. A save that fails in the
background (disk full, unwritable directory) raises `CheckpointError` naming the step directory
at the first `check()` after it failed (the loop checks at every log boundary) or at `wait()`.

Restoring takes the newest checkpoint that restores: a checkpoint that fails to (truncated array
file, missing metadata) is reported with a warning and, when an older one restores, moved aside
to `workdir/checkpoints_unusable/<step>` so the run can save that step again (single-process
runs; with several processes it stays and is skipped again at the next start).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

log = logging.getLogger("jaxpost.train")


class CheckpointError(RuntimeError):
  """A checkpoint save failed, or no checkpoint of a run restores."""


def checkpoint_dir(workdir) -> Path:
  return Path(workdir).absolute() / "checkpoints"


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the two items above."""

  def __init__(self, workdir, keep: Optional[int] = None, async_save: bool = True,
               read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only, read_only=read_only, create=not read_only,
        # directories are made in save(), so an unwritable path raises there, not in a thread
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    self.read_only = read_only
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))
    self._in_flight = None  # the step of the last save not yet known to be complete
    self._failed = False

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config, data_inputs=None) -> bool:
    """Starts an async save of `state` at `step` (no-op if that step is already saved)."""
    if step in self.manager.all_steps():
      return False
    self.wait()  # Orbax waits for the previous save anyway; this names it if it failed
    meta = {"step": step, "data": data_state, "data_inputs": data_inputs,
            "config": config.to_json_best_effort()}
    self._in_flight = step
    with self._failure_of(step):
      started = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    return started

  def check(self):
    """Raises `CheckpointError` if the last async save has finished and failed; never blocks."""
    if self._in_flight is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self):
    """Blocks until the last save is complete; `CheckpointError` if it failed."""
    if self._in_flight is None:
      return
    with self._failure_of(self._in_flight):
      self.manager.wait_until_finished()
    self._in_flight = None

  @contextlib.contextmanager
  def _failure_of(self, step: int):
    """Any exception inside becomes a `CheckpointError` naming the step's directory."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as err:  # pylint: disable=broad-except
      self._in_flight, self._failed = None, True
      raise CheckpointError(f"checkpoint save of step {step} to {self.directory / str(step)} "
                            f"failed: {type(err).__name__}: {err}") from err

  def restore(self, step: int, abstract_state):
    """(state placed like `abstract_state`'s shardings, data position, saved config)."""
    state, meta = self._restore(step, abstract_state)
    return state, meta["data"], saved_config(meta)

  def _restore(self, step: int, abstract_state):
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_as_saved(self, step: int) -> dict:
    """The state item of `step` as saved (nested dicts of arrays, no restore target): for
    reading one part of a state whose full shape the caller cannot rebuild."""
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]

  def restore_newest(self, abstract_state):
    """(step, state, meta) of the newest checkpoint that restores, or None without checkpoints.
    Newer ones that fail are named in a warning and moved aside (see the module docstring)."""
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, meta = self._restore(step, abstract_state)
      except Exception as err:  # pylint: disable=broad-except  # any reason: try an older one
        log.warning("checkpoint %s does not restore (%s: %s); trying an older one",
                    self.directory / str(step), type(err).__name__, str(err).splitlines()[0][:300])
        failed.append((step, err))
        continue
      self._set_aside([s for s, _ in failed], step)
      return step, state, meta
    if failed:
      step, err = failed[0]
      raise CheckpointError(f"no checkpoint under {self.directory} restores (tried steps "
                            f"{[s for s, _ in failed]}); the newest, step {step}, failed with "
                            f"{type(err).__name__}: {err}") from err
    return None

  def _set_aside(self, steps: list[int], good: int):
    if not steps:
      return
    aside = self.directory.parent / "checkpoints_unusable"
    if not self.read_only and jax.process_count() == 1:  # else every process would have to
      aside.mkdir(exist_ok=True)
      for step in steps:
        target = aside / str(step)
        while target.exists():
          target = target.with_name(target.name + "_")
        shutil.move(str(self.directory / str(step)), str(target))
      self.manager.reload()
    log.warning("using checkpoint step %d; unusable newer checkpoint(s) %s%s", good,
                ", ".join(str(self.directory / str(s)) for s in steps),
                "" if self.read_only else f" moved to {aside}")

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def close(self):
    """Waits for the last save (`CheckpointError` if it failed unreported) and closes; after a
    reported failure Orbax's own repeat of the error is not raised again."""
    if not self._failed:
      self.wait()
      self.manager.close()
      return
    try:
      self.manager.close()
    except Exception as err:  # pylint: disable=broad-except
      log.debug("closing after a failed save: %s", err)


def changed_inputs(saved: Optional[dict], now: dict) -> list[str]:
  """"key: saved -> now" for each key whose value differs (nothing when `saved` is unknown)."""
  if not saved:
    return []
  return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in {**saved, **now}
          if saved.get(k) != now.get(k)]


def saved_config(meta: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(meta["config"]))
