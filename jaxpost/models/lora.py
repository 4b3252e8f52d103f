"""LoRA: low-rank adapters on frozen projection weights (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models").

For a targeted projection with frozen kernel W [in, out] the layer computes

    y = x W (+ bias) + (alpha / r) * dropout(x) A B,      A [in, r],  B [r, out]

with A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's Kaiming-uniform default) and B = 0, so at
initialisation the adapted model is exactly the base model. Only A and B (and, for a reward
model, the new score head) are trained; W never receives a gradient or optimiser state.

Adapters live in their own parameter tree that mirrors the base tree with leaves `lora_a` /
`lora_b` next to each targeted `kernel` (stacked on the layer axis when layers are scanned):

    base      model/layers/self_attn/q_proj/kernel    [L, in, out]
    adapters  model/layers/self_attn/q_proj/lora_a    [L, in, r]
              model/layers/self_attn/q_proj/lora_b    [L, r, out]

`combine(base, adapters)` is the tree the model applies. `Linear` adds the low-rank term only when
its adapter leaves are present, so applying the base tree alone is the model with adapters off —
the DPO/KTO reference costs no second copy of the weights. `merge` folds the adapters into the
kernels (W + alpha/r A B) for a plain HF export; `jaxpost.hf.save_peft_adapter` writes the
adapters as a directory that `peft.PeftModel.from_pretrained` loads onto the transformers base.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

# Module paths (slash-joined, without the leaf name) matched by `re.fullmatch`.
DEFAULT_TARGETS = r"model/layers(_\d+)?/(self_attn|mlp)/\w+_proj"
ADAPTER_LEAVES = ("lora_a", "lora_b")


def dense(x, kernel):
  """x [..., in] @ kernel [in, out] as one 2-D matmul over the flattened leading dims. Same
  values as `jnp.dot(x, kernel)`, but the weight gradient then contracts one (rows) dimension
  instead of (batch, time): XLA:CPU otherwise materialises a transposed [out, batch, time] copy
  of the output gradient for it, and an MLP forward + backward at B=8, T=128 runs 1.6x slower
  (measured on the 2-core CPU of BENCHMARKS.md)."""
  return jnp.dot(x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])


class Linear(nn.Module):
  """`nn.Dense` (same parameter names, initialiser and dtype promotion) plus the LoRA term when
  the parameter tree holds `lora_a` / `lora_b` for this module. Dropout on the adapter input is
  active only when the caller passes a "dropout" rng (training)."""
  features: int
  axes: tuple
  use_bias: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
        (x.shape[-1], self.features), self.param_dtype)
    x = x.astype(self.dtype)
    y = dense(x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.axes[-1:]),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.has_variable("params", "lora_a"):
      y = y + self._low_rank(x)
    return y

  def _low_rank(self, x):
    a = self.get_variable("params", "lora_a").astype(self.dtype)
    b = self.get_variable("params", "lora_b").astype(self.dtype)
    if self.lora_dropout > 0 and self.has_rng("dropout"):
      x = nn.Dropout(self.lora_dropout, deterministic=False)(x)
    return (self.lora_alpha / a.shape[-1]) * dense(dense(x, a), b)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """`config.lora`: rank r (0 = off), alpha, dropout, targets (regex fully matching a module
  path such as `model/layers/self_attn/q_proj`), trainable (regex of other module paths trained
  in full, e.g. a reward model's new `score` head) and export ("merged" or "peft")."""
  rank: int
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = DEFAULT_TARGETS
  trainable: str = ""
  export: str = "merged"

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"config.lora.rank={self.rank} must be >= 0 (0 disables LoRA)")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"config.lora.dropout={self.dropout} must be in [0, 1)")
    if self.export not in ("merged", "peft"):
      raise ValueError(f"config.lora.export={self.export!r} must be 'merged' or 'peft'")
    for key in ("targets", "trainable"):
      try:
        re.compile(getattr(self, key))
      except re.error as e:
        raise ValueError(f"config.lora.{key}={getattr(self, key)!r} is not a regex: {e}") from e

  @classmethod
  def from_config(cls, config) -> Optional["LoraSpec"]:
    """The spec of `config.lora`, or None when absent or rank 0."""
    lora = config.get("lora", None)
    if lora is None or not lora.get("rank", 0):
      return None
    return cls(**{f.name: lora[f.name] for f in dataclasses.fields(cls) if f.name in lora})


def module_path(path) -> str:
  return "/".join(path[:-1])


def target_modules(params, spec: LoraSpec) -> list[tuple]:
  """Paths of the kernels whose module path matches `spec.targets`; raises if there are none."""
  flat = traverse_util.flatten_dict(params)
  found = [p for p in flat if p[-1] == "kernel" and re.fullmatch(spec.targets, module_path(p))]
  if not found:
    modules = sorted({module_path(p) for p in flat if p[-1] == "kernel"})
    raise ValueError(f"config.lora.targets={spec.targets!r} matches no projection; module paths "
                     f"are: {modules}")
  return sorted(found)


def init_adapters(params, spec: LoraSpec, rng) -> dict:
  """A ~ U(+-1/sqrt(in)), B = 0 for every targeted kernel [..., in, out], in the kernel's dtype
  and with shardings derived from the kernel's (A keeps its input axis, B its output axis)."""
  flat = traverse_util.flatten_dict(params)
  adapters = {}
  for i, path in enumerate(target_modules(params, spec)):
    kernel = flat[path]
    *lead, fan_in, fan_out = kernel.shape
    bound = 1.0 / np.sqrt(fan_in)
    a_sh, b_sh = _adapter_shardings(kernel)
    a = jax.jit(lambda k: jax.random.uniform(k, (*lead, fan_in, spec.rank), kernel.dtype,
                                             -bound, bound), out_shardings=a_sh)
    b = jax.jit(lambda: jnp.zeros((*lead, spec.rank, fan_out), kernel.dtype),
                out_shardings=b_sh)
    adapters[path[:-1] + ("lora_a",)] = a(jax.random.fold_in(rng, i))
    adapters[path[:-1] + ("lora_b",)] = b()
  return traverse_util.unflatten_dict(adapters)


def _adapter_shardings(kernel):
  """(A, B) shardings: A = kernel spec with the output axis replicated, B with the input one."""
  sharding = getattr(kernel, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return None, None
  spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
  return (NamedSharding(sharding.mesh, P(*spec[:-1], None)),
          NamedSharding(sharding.mesh, P(*spec[:-2], None, spec[-1])))


def partition(params, pattern: str) -> tuple[dict, dict]:
  """(leaves whose module path fully matches `pattern`, the rest), as two nested trees."""
  flat = traverse_util.flatten_dict(params)
  hit = {p: v for p, v in flat.items() if pattern and re.fullmatch(pattern, module_path(p))}
  rest = {p: v for p, v in flat.items() if p not in hit}
  return traverse_util.unflatten_dict(hit), traverse_util.unflatten_dict(rest)


def split_trainable(params, spec: LoraSpec, rng) -> tuple[dict, dict]:
  """(trainable, frozen base) of a loaded model: fresh adapters on the targeted projections plus
  the modules matching `spec.trainable` (e.g. a reward model's `score` head), and the rest."""
  trained, base = partition(params, spec.trainable)
  return combine(init_adapters(base, spec, rng), trained), base


def adapters_of(params) -> dict:
  """The `lora_a` / `lora_b` leaves of a tree."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[-1] in ADAPTER_LEAVES})


def has_adapters(params) -> bool:
  return any(p[-1] in ADAPTER_LEAVES for p in traverse_util.flatten_dict(params))


def combine(base, adapters) -> dict:
  """The union of two trees with disjoint leaves (the tree the model applies)."""
  flat = traverse_util.flatten_dict(base)
  flat.update(traverse_util.flatten_dict(adapters))
  return traverse_util.unflatten_dict(flat)


def merge(params, alpha: float) -> dict:
  """Folds every adapter pair of a combined tree into its kernel: W + (alpha / r) A B, in W's
  dtype; the result has no adapter leaves (a plain model)."""
  flat = traverse_util.flatten_dict(params)
  out = {p: v for p, v in flat.items() if p[-1] not in ADAPTER_LEAVES}
  for path in flat:
    if path[-1] == "lora_a":
      a, b = flat[path], flat[path[:-1] + ("lora_b",)]
      kernel_path = path[:-1] + ("kernel",)
      kernel = out[kernel_path]
      delta = (alpha / a.shape[-1]) * jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32),
                                                  b.astype(jnp.float32))
      out[kernel_path] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(out)


def num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def describe(base, adapters) -> str:
  """One line: trainable vs frozen parameter counts."""
  trained, frozen = num_params(adapters), num_params(base)
  return (f"LoRA: {trained:,} trainable parameters, {frozen:,} frozen "
          f"({100.0 * trained / max(frozen, 1):.2f}%)")

