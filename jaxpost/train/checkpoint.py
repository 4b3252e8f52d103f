"""Orbax checkpoints in `workdir/checkpoints/<step>/`: the train state and a JSON `meta` item.

    state: TrainState(step, params, opt_state, rng)   sharded arrays, restored onto the mesh
    meta:  {"step", "data": loader.state(), "config": the run config as JSON}

Saves are asynchronous (the step loop continues while the arrays are written) and atomic: Orbax
writes into a temporary directory and renames it when complete, so a process killed mid-save
leaves the previous checkpoint as the latest usable one (the partial directory is ignored and
cleaned up on the next start). At most `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import ml_collections
import orbax.checkpoint as ocp


def checkpoint_dir(workdir) -> Path:
  return Path(workdir).absolute() / "checkpoints"


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the two items above."""

  def __init__(self, workdir, keep: Optional[int] = None, async_save: bool = True,
               read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only, read_only=read_only, create=not read_only)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config) -> bool:
    """Starts an async save of `state` at `step` (no-op if that step is already saved)."""
    if step in self.manager.all_steps():
      return False
    meta = {"step": step, "data": data_state, "config": config.to_json_best_effort()}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state):
    """(state placed like `abstract_state`'s shardings, data position, saved config)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    meta = restored["meta"]
    return restored["state"], meta["data"], saved_config(meta)

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def saved_config(meta: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(meta["config"]))
