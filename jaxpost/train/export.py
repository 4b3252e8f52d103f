"""Export trained parameters as an HF directory (transformers / vLLM load it) or, for LoRA runs,
optionally as a PEFT adapter directory.

    export_trained(policy, params, frozen, mesh, out_dir, lora)   end of a run (config.export_hf)
    load_trained(workdir, step=None) -> LoadedModel     from a run's checkpoint (LoRA: base +
                                                        adapters; run_lora(workdir) is its spec)
    save_trained(lm, lora, out_dir, fmt=None)           writes it (scripts/export_hf.py)
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import jax

from jaxpost.hf import (LoadedModel, build_module, load_tokenizer, resolve_model_dir, save_model,
                        save_peft_adapter)
from jaxpost.models import lora as lora_lib
from jaxpost.models.lora import LoraSpec
from jaxpost.train import algorithms
from jaxpost.train import sharding as sh
from jaxpost.train.checkpoint import Checkpointer, saved_config
from jaxpost.train.optim import build_optimizer
from jaxpost.train.state import (abstract_like, abstract_train_state, create_train_state,
                                 load_sharded, model_config)

log = logging.getLogger("jaxpost.train")


def gather_to_host(params, mesh):
  """The full (unsharded) tree as numpy arrays on every process."""
  gathered = jax.jit(lambda p: p, out_shardings=sh.replicated(mesh))(params)
  return jax.device_get(jax.tree.map(lambda x: x.addressable_data(0), gathered))


def export_trained(policy: LoadedModel, params, frozen, mesh, out_dir,
                   lora: Optional[LoraSpec] = None) -> Path:
  """Writes the trained policy on process 0: HF weights (LoRA merged) or, with
  `lora.export == "peft"`, the adapters only."""
  if lora is not None and lora.export == "peft":
    params = gather_to_host(algorithms.policy_params(params), mesh)
  else:
    params = gather_to_host(algorithms.applied_policy(params, frozen), mesh)
  if jax.process_index() != 0:
    return Path(out_dir)
  return save_trained(dataclasses.replace(policy, params=params), lora, out_dir)


def save_trained(lm: LoadedModel, lora: Optional[LoraSpec], out_dir, fmt: Optional[str] = None):
  """`fmt` "merged" (default without LoRA) writes an HF model; "peft" (LoRA only) writes
  adapter_config.json + adapter_model.safetensors for the base model `lm` was trained from."""
  fmt = fmt or (lora.export if lora is not None else "merged")
  log.info("export: writing %s (%s) to %s", lm.source, fmt, out_dir)
  if fmt == "merged":
    return save_model(lm, str(out_dir))
  if lora is None:
    raise ValueError("export format 'peft' needs a LoRA run (config.lora.rank > 0)")
  base = lm.source.split("@")[0]
  out = save_peft_adapter(lora_lib.adapters_of(lm.params), lora, lm.config.scan_layers, out_dir,
                          _base_model_path(base))
  if lm.tokenizer is not None:
    lm.tokenizer.save_pretrained(str(out))
  return out


def _base_model_path(name: str) -> str:
  """A path transformers can load for `base_model_name_or_path` (bundled names resolve)."""
  try:
    return str(resolve_model_dir(name))
  except (FileNotFoundError, ValueError, OSError):
    return name


def _open(workdir, step: Optional[int]):
  """(checkpointer, step, run config) of `step` or the latest checkpoint of a run."""
  ckpt = Checkpointer(workdir, read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint under {workdir}/checkpoints")
  return ckpt, step, saved_config(ckpt.restore_meta(step))


def run_lora(workdir) -> Optional[LoraSpec]:
  """The LoRA spec a run trained with (None for full finetuning)."""
  ckpt, _, config = _open(workdir, None)
  ckpt.close()
  return LoraSpec.from_config(config)


def load_trained(workdir, step: Optional[int] = None) -> LoadedModel:
  """The policy of a run's checkpoint (`step` or the latest) on the local devices. A LoRA
  policy holds base + adapters (`save_trained` merges them or writes PEFT). A run with several
  trainable members (PPO: policy + critic) gives its policy."""
  ckpt, step, config = _open(workdir, step)
  log.info("export: restoring step %d from %s", step, ckpt.directory)
  algorithm = algorithms.get(config.algorithm)
  head = algorithm.head
  lora = LoraSpec.from_config(config)
  mesh = sh.build_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  rules = sh.rules_of(config.mesh)
  tx, _ = build_optimizer(config.optimizer, config.max_steps)
  source = f"{config.model.name_or_path}@{step}"
  members = algorithm.members is not None  # the other members' shapes: as saved
  if lora is None:
    cfg, model_dir = model_config(config.model, config.model.name_or_path)
    module = build_module(cfg, head)
    if members:
      trained = ckpt.restore_as_saved(step)["params"]
    else:
      extra = algorithm.init_extra(config)
      trained = ckpt.restore(step, abstract_train_state(module, tx, mesh, rules, extra))[0].params
    tokenizer = load_tokenizer(model_dir) if model_dir else None
    lm = LoadedModel(module, jax.device_get(algorithms.policy_params(trained)), tokenizer, cfg,
                     head, source)
  else:
    with jax.set_mesh(mesh):
      policy = load_sharded(config.model, mesh, rules, head, seed=config.seed, lora=lora)
    trainable, base = lora_lib.split_trainable(policy.params, lora, jax.random.PRNGKey(0))
    if members:
      trained = ckpt.restore_as_saved(step)["params"]
    else:
      state, state_sh = create_train_state(trainable, tx, config.seed, mesh,
                                           algorithm.init_extra(config))
      trained = ckpt.restore(step, abstract_like(state, state_sh))[0].params
    params = jax.device_get(lora_lib.combine(base, algorithms.policy_params(trained)))
    lm = dataclasses.replace(policy, params=params, source=source)
  ckpt.close()
  return lm
