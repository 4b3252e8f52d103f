"""Device mesh, logical-axis rules and the shardings of state and batches.

The mesh has axes ("data", "fsdp", "tensor") sized by `config.mesh` (one size may be -1: the rest
of the devices). Model parameters and activations carry logical axis names; `config.mesh.rules`
maps each name to mesh axes, e.g. the default shards

    batch -> (data, fsdp)     embed -> fsdp (ZeRO-3 style)     heads/kv_heads/mlp/vocab -> tensor

Optimiser-state leaves shaped like a parameter inherit that parameter's sharding; other leaves
(step counts, Adafactor's factored moments) are replicated. Batches are sharded on their leading
(row) axis over ("data", "fsdp"); each process contributes its local rows.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpost.models.llama import logical_axes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple:
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not "
                       f"divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; "
                     f"{num_devices} are available")
  return tuple(sizes)


def build_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = devices if devices is not None else jax.devices()
  shape = mesh_shape(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def rules_of(mesh_cfg) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in (mesh_cfg.get("rules") or DEFAULT_RULES))


def param_shardings(module, mesh: Mesh, rules):
  """NamedSharding for every parameter of `module` from its logical axis names."""
  return nn.logical_to_mesh_sharding(logical_axes(module), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, axes=BATCH_AXES) -> NamedSharding:
  """Splits a leading batch (row) axis over the mesh axes `axes` (a name or a tuple of names);
  the other array axes are replicated."""
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return NamedSharding(mesh, P(axes))


def without_axis(rules, axis: str) -> tuple:
  """`rules` with mesh axis `axis` dropped from every mapping: e.g. the decode copy of the
  weights, whole over "fsdp" (gathered once per rollout instead of once per decoded token) and
  still split over "tensor"."""
  def drop(axes):
    if axes is None or isinstance(axes, str):
      return None if axes == axis else axes
    kept = tuple(a for a in axes if a != axis)
    return kept or None
  return tuple((name, drop(axes)) for name, axes in rules)


def constrain_rows(x, sharding: Optional[NamedSharding]):
  """`x` constrained to have its leading (row) axis split like the first axis of `sharding` (a
  `batch_sharding`), its other axes replicated; `x` as is when `sharding` is None."""
  if sharding is None:
    return x
  spec = P(sharding.spec[0], *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))


def like_params(abstract_tree, abstract_params, params_shardings, mesh: Mesh):
  """Shardings for a tree whose leaves mirror parameters (optimiser moments): a leaf whose key
  path ends with a parameter's path and has its shape gets that parameter's sharding."""
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_shardings = jax.tree.leaves(params_shardings)
  by_path = {_keys(path): (leaf.shape, sharding)
             for (path, leaf), sharding in zip(flat_params, flat_shardings)}

  def pick(path, leaf):
    keys = _keys(path)
    for start in range(len(keys)):
      shape, sharding = by_path.get(keys[start:], (None, None))
      if shape == leaf.shape:
        return sharding
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def _keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def global_batch(local_batch: dict, sharding: NamedSharding, process_count: int) -> dict:
  """Assembles each process's local rows into global jax.Arrays sharded on the row axis."""
  def put(x):
    x = np.asarray(x)
    shape = (x.shape[0] * process_count,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)
  return {k: put(v) for k, v in local_batch.items()}
