"""Export trained parameters as an HF directory (transformers / vLLM load it).

    export_params(policy, params, mesh, out_dir)      at the end of a run (config.export_hf)
    load_trained(workdir, step=None) -> LoadedModel   from a run's checkpoint (scripts/export_hf.py)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import jax

from jaxpost.hf import LoadedModel, build_module, load_tokenizer, save_model
from jaxpost.train import algorithms
from jaxpost.train import sharding as sh
from jaxpost.train.checkpoint import Checkpointer, saved_config
from jaxpost.train.optim import build_optimizer
from jaxpost.train.state import abstract_train_state, model_config


def export_params(policy: LoadedModel, params, mesh, out_dir) -> Path:
  """Gathers `params` (possibly sharded over processes) and writes them with `save_model` on
  process 0."""
  gathered = jax.jit(lambda p: p, out_shardings=sh.replicated(mesh))(params)
  if jax.process_index() != 0:
    return Path(out_dir)
  host = jax.tree.map(lambda x: x.addressable_data(0), gathered)
  return save_model(dataclasses.replace(policy, params=jax.device_get(host)), str(out_dir))


def load_trained(workdir, step: Optional[int] = None) -> LoadedModel:
  """The policy of a run's checkpoint (`step` or the latest), on the local devices."""
  ckpt = Checkpointer(workdir, read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint under {workdir}/checkpoints")
  config = saved_config(ckpt.restore_meta(step))
  head = algorithms.get(config.algorithm).head
  cfg, model_dir = model_config(config.model, config.model.name_or_path)
  module = build_module(cfg, head)
  mesh = sh.build_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  rules = sh.rules_of(config.mesh)
  tx, _ = build_optimizer(config.optimizer, config.max_steps)
  abstract = abstract_train_state(module, tx, mesh, rules)
  state, _, _ = ckpt.restore(step, abstract)
  ckpt.close()
  tokenizer = load_tokenizer(model_dir) if model_dir else None
  return LoadedModel(module, jax.device_get(state.params), tokenizer, cfg, head,
                     f"{workdir}@{step}")
