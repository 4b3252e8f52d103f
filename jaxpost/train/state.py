"""Train state and model construction, created directly with their final shardings.

`TrainState` holds what the optimiser updates plus what must resume exactly:

    step: int32 [] optimiser updates so far (the LR schedule's clock; a rollout iteration makes
          several)    params: trainable tree (fp32 master)    opt_state    rng: PRNGKey (dropout,
          minibatch order, rollout sampling all derive from it)
    extra: algorithm state that must resume (a dict of arrays, `Algorithm.init_extra`; e.g. an
           adaptive KL coefficient), {} for most algorithms

Frozen trees (a reference model, a reward model, a LoRA base) live outside it, so they have no
optimiser state and are not donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from jaxpost.hf import (LoadedModel, build_module, load_model, load_tokenizer, read_hf_config,
                        resolve_model_dir)
from jaxpost.models.config import LlamaConfig
from jaxpost.models.llama import init_params
from jaxpost.models.lora import LoraSpec
from jaxpost.train import sharding as sh


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  extra: Any = flax.struct.field(default_factory=dict)


def model_config(model_cfg, name_or_path: str, lora: Optional[LoraSpec] = None):
  """(LlamaConfig, model dir or None) for `config.model` (runtime dtypes, remat, overrides)
  and, for a LoRA policy, the adapters' alpha and dropout."""
  model_dir = resolve_model_dir(name_or_path) if name_or_path else None
  hf = read_hf_config(model_dir) if model_dir else {"model_type": "llama"}
  if model_cfg.random_init:
    hf = {**hf, **dict(model_cfg.overrides)}
  elif model_cfg.overrides:
    raise ValueError("config.model.overrides only applies with config.model.random_init=True")
  runtime = dict(dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
                 scan_layers=model_cfg.scan_layers, remat_policy=model_cfg.remat_policy)
  if lora is not None:
    runtime.update(lora_alpha=lora.alpha, lora_dropout=lora.dropout)
  return LlamaConfig.from_hf(hf, **runtime), model_dir


def load_sharded(model_cfg, mesh, rules, head: str = "lm", name_or_path=None,
                 seed: int = 0, lora: Optional[LoraSpec] = None) -> LoadedModel:
  """Loads (or randomly initialises, with `model_cfg.random_init`) a model whose parameters are
  created directly with their mesh shardings; `name_or_path` defaults to the policy's. Another
  checkpoint (`name_or_path` given: a DPO reference) is read as it is: `random_init` and
  `overrides` shape the policy only."""
  if name_or_path is not None and model_cfg.random_init:
    model_cfg = model_cfg.copy_and_resolve_references()
    model_cfg.random_init, model_cfg.overrides = False, {}
  name = model_cfg.name_or_path if name_or_path is None else name_or_path
  cfg, model_dir = model_config(model_cfg, name, lora)
  module = build_module(cfg, head)
  shardings = sh.param_shardings(module, mesh, rules)
  if model_cfg.random_init:
    init = jax.jit(lambda key: init_params(module, key), out_shardings=shardings)
    params = init(jax.random.PRNGKey(seed))
    tokenizer = load_tokenizer(model_dir) if model_dir else None
    return LoadedModel(module, params, tokenizer, cfg, head, name or "random")
  loaded = load_model(name, dtype=cfg.dtype, param_dtype=cfg.param_dtype, head=head,
                      scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy,
                      shardings=shardings, seed=seed)
  return dataclasses.replace(loaded, model=module, config=cfg)


def create_train_state(params, tx, seed: int, mesh, extra=None):
  """(state, state shardings); the optimiser state is initialised already sharded like params;
  `extra` (a dict of arrays, default {}) is replicated."""
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  abstract_params = jax.eval_shape(lambda p: p, params)
  opt_sh = sh.like_params(jax.eval_shape(tx.init, abstract_params), abstract_params, param_sh,
                          mesh)
  rep = sh.replicated(mesh)
  extra = jax.tree.map(jnp.asarray, extra or {})
  shardings = TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep,
                         extra=jax.tree.map(lambda _: rep, extra))
  state = TrainState(
      step=jax.device_put(jnp.zeros((), jnp.int32), rep),
      params=params,
      opt_state=jax.jit(tx.init, out_shardings=opt_sh)(params),
      rng=jax.device_put(jax.random.fold_in(jax.random.PRNGKey(seed), 1), rep),
      extra=jax.device_put(extra, rep))
  return state, shardings


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def abstract_train_state(module, tx, mesh, rules, extra=None):
  """The TrainState of `module` as sharded ShapeDtypeStructs, without reading any weights
  (`extra`: the algorithm's initial extra state, for its shapes)."""
  param_sh = sh.param_shardings(module, mesh, rules)
  params = jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0)))
  opt_state = jax.eval_shape(tx.init, params)
  rep = sh.replicated(mesh)
  extra = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, extra or {}))
  shardings = TrainState(step=rep, params=param_sh, rng=rep,
                         opt_state=sh.like_params(opt_state, params, param_sh, mesh),
                         extra=jax.tree.map(lambda _: rep, extra))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=opt_state, rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                        extra=extra)
  return abstract_like(abstract, shardings)
