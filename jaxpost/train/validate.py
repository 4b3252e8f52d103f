"""Up-front checks of a run config: `check(config)` runs before any weights or data are loaded,
and a bad value fails with a `ConfigError` naming its key.

Keys the loop owns are checked here:

    batch_size >= 1, grad_accum >= 1, batch_size % grad_accum == 0, and each microbatch
    (batch_size / grad_accum rows) divisible by the data-parallel devices (mesh data x fsdp)
    and batch_size by the processes; max_steps >= 1 unless num_epochs > 0; log_every,
    eval_every >= 0; eval_batches, logprob_chunk_size >= 1; checkpoint.keep >= 0; report.*;
    workdir writable (or creatable).

Every other key is checked by the code that owns it, called here: the algorithm's own keys
(`Algorithm.check_config`, e.g. the preference loss config parses loss_type and beta),
optimizer.* (train/optim.py), model.* (train/state.py `model_config`: dtypes, remat policy,
overrides, the checkpoint's config.json; no weights are read), mesh.* (train/sharding.py),
lora.* (models/lora.py `LoraSpec`), evals.* (train/evals.py: types, keys, values), data.* (the
source specs, truncation limits and train_on of jaxpost/data, and the eval plan of
jaxpost/data/heldout.py).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

from jaxpost.data import heldout
from jaxpost.data.chat import TRAIN_ON, Limits
from jaxpost.data.loader import check_packing, parse_sources
from jaxpost.data.synthetic import parse_spec
from jaxpost.data.tasks import reward_fn
from jaxpost.models.lora import LoraSpec
from jaxpost.train import algorithms, evals
from jaxpost.train import sharding as sh
from jaxpost.train.optim import check_optimizer_config
from jaxpost.train.state import model_config


class ConfigError(ValueError):
  """A config value that cannot run; the message names the key."""


def check(config, num_devices: int, num_processes: int = 1, own_data: bool = True):
  """Raises ConfigError on the first bad key; `own_data` is False when the caller passes its
  own loaders (data.* is then not read)."""
  with _owner("config"):
    algorithm = algorithms.get(config.algorithm)
    _check_loop_keys(config)
    _check_batch_split(config, num_devices, num_processes)
    if algorithm.check_config is not None:
      algorithm.check_config(config)
  with _owner("config.evals"):
    evals.check(config, algorithm)
  with _owner("config.optimizer"):
    check_optimizer_config(config.optimizer)
  with _owner("config.lora"):
    if config.get("lora") is not None:  # every lora.* key, also when rank 0 turns LoRA off
      LoraSpec(**config.lora.to_dict())
    lora = LoraSpec.from_config(config)
  with _owner("config.model"):
    model_config(config.model, config.model.name_or_path, lora)
  if own_data:
    with _owner("config.data"):
      _check_data(config, algorithm.loader_kind)
  _check_workdir(config.workdir)


@contextlib.contextmanager
def _owner(prefix: str):
  """Re-raises an owner's error as a ConfigError, prefixed with the key section unless the
  message already names a `config.` key."""
  try:
    yield
  except ConfigError:
    raise
  except (ValueError, KeyError, FileNotFoundError, NotADirectoryError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, KeyError):
      message = f"missing field {message!r}"
    raise ConfigError(message if "config." in message else f"{prefix}: {message}") from e


def _at_least(config, key: str, low: int):
  value = config
  for part in key.split("."):
    value = value[part]
  if not value >= low:
    raise ConfigError(f"config.{key}={value} must be >= {low}")


def _check_loop_keys(config):
  for key, low in (("batch_size", 1), ("grad_accum", 1), ("log_every", 0), ("eval_every", 0),
                   ("eval_batches", 1), ("logprob_chunk_size", 1), ("checkpoint.keep", 0)):
    _at_least(config, key, low)
  epochs = config.get("num_epochs", 0)
  if not (epochs >= 0 and math.isfinite(epochs)):
    raise ConfigError(f"config.num_epochs={epochs} must be >= 0 (0: max_steps decides)")
  if not epochs and config.max_steps < 1:
    raise ConfigError(f"config.max_steps={config.max_steps} must be >= 1 (or set "
                      "config.num_epochs > 0)")
  task = heldout.report_task(config)
  if task:
    with _owner(f"config.report.task={task!r}"):
      reward_fn(task)  # raises naming the known tasks
    _at_least(config, "report.examples", 1)
    _at_least(config, "report.max_new_tokens", 1)


def _check_batch_split(config, num_devices: int, num_processes: int):
  """Each microbatch is sharded over the data-parallel axes: its rows must divide evenly."""
  batch, accum = config.batch_size, config.grad_accum
  if batch % accum:
    raise ConfigError(f"config.batch_size={batch} is not divisible by config.grad_accum={accum} "
                      "(batch_size is the global batch; grad_accum splits it)")
  shape = dict(zip(sh.MESH_AXES, sh.mesh_shape(config.mesh, num_devices)))
  parallel = shape["data"] * shape["fsdp"]
  if (batch // accum) % parallel:
    raise ConfigError(
        f"config.batch_size={batch} / config.grad_accum={accum} = {batch // accum} rows per "
        f"microbatch, not divisible by the {parallel} data-parallel devices (config.mesh: data "
        f"{shape['data']} x fsdp {shape['fsdp']} of {num_devices} devices)")
  if batch % num_processes:
    raise ConfigError(f"config.batch_size={batch} is not divisible by the {num_processes} "
                      "processes")
  _check_shared_split(config, accum, parallel)


def _check_shared_split(config, accum: int, parallel: int):
  """Packed prefix-shared pair rows hold several pairs each and vary in number (down to 1), so
  they are neither split into microbatches nor sharded."""
  packed = (config.data.get("prefix_sharing", False) and config.data.packing
            and algorithms.get(config.algorithm).loader_kind == "preference")
  if packed and accum > 1:
    raise ConfigError(f"config.grad_accum={accum} with config.data.packing=True and "
                      "data.prefix_sharing=True: packed pair rows are not split into "
                      "microbatches; set grad_accum=1 or data.packing=False")
  if packed and parallel > 1:
    raise ConfigError(f"config.data.packing=True with data.prefix_sharing=True runs on one "
                      f"data-parallel device (config.mesh gives {parallel}); set data.packing="
                      "False to shard one pair per row")


def _check_data(config, kind: str):
  data = config.data
  for key in ("train", "eval"):
    source = data[key]
    if key == "eval" and (not source or source == heldout.AUTO):
      continue
    if isinstance(source, str) and source.startswith("synthetic"):
      parse_spec(source)
      if kind != "sft":
        raise ConfigError(f"config.data.{key}={source!r} only provides 'sft' batches; "
                          f"config.algorithm={config.algorithm!r} needs {kind!r} rows")
    else:
      parse_sources(source)
  length = data.max_length
  if not (isinstance(length, int) and length >= 1):
    raise ConfigError(f"config.data.max_length={length!r} must be an int >= 1")
  prompt, completion = data.max_prompt_length, data.max_completion_length
  if prompt is not None and not 1 <= prompt < length:
    raise ConfigError(f"config.data.max_prompt_length={prompt} must be in [1, data.max_length="
                      f"{length}) (the completion needs room)")
  if completion is not None and not 1 <= completion <= length:
    raise ConfigError(f"config.data.max_completion_length={completion} must be in [1, "
                      f"data.max_length={length}]")
  Limits(length, prompt, completion, data.truncation_mode)
  if data.train_on not in TRAIN_ON:
    raise ConfigError(f"config.data.train_on={data.train_on!r}; choose one of {TRAIN_ON}")
  try:
    check_packing(kind, data.packing, data.get("prefix_sharing", False))
  except ValueError as e:
    raise ConfigError(f"config.{e} (config.algorithm={config.algorithm!r})") from e
  fraction = data.get("eval_fraction", 0.0)
  if not 0.0 <= fraction < 1.0:
    raise ConfigError(f"config.data.eval_fraction={fraction} must be in [0, 1)")
  if fraction and data.eval != heldout.AUTO:
    raise ConfigError(f"config.data.eval_fraction={fraction} holds out training rows only with "
                      f"config.data.eval='auto' (got data.eval={data.eval!r}); set one of them")


def _check_workdir(workdir):
  """The workdir, or its nearest existing parent, must be a writable directory."""
  path = Path(str(workdir)).expanduser().absolute()
  existing = next(p for p in (path, *path.parents) if p.exists())
  if not existing.is_dir():
    raise ConfigError(f"config.workdir={str(workdir)!r}: {existing} is not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"config.workdir={str(workdir)!r}: {existing} is not writable")
