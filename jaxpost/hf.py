"""Hugging Face interop: HF directory / hub id / bundled GGUF  <->  (config, params, tokenizer).

Parameter names follow HF's by rule, so no table is needed:

    flax  model/layers/self_attn/q_proj/kernel  [L, D, H*d]   (scanned: layer axis first)
    HF    model.layers.{i}.self_attn.q_proj.weight  [H*d, D]  (one per layer, transposed)

`kernel` <-> `weight` (transposed), `scale`/`embedding` <-> `weight`, `bias` <-> `bias`.
Loading walks the expected parameter tree and reads each tensor from the safetensors files
through a memory map, casts it, stacks the layers into one preallocated array and places it on
device (sharded when `shardings` is given) before reading the next, so the host never holds two
full copies of the model.

Export writes an HF directory (LoRA adapters merged), or with `save_peft_adapter` a LoRA run's
adapters alone in PEFT's layout (`peft.PeftModel.from_pretrained` loads them onto the base).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from jaxpost.models import lora
from jaxpost.models.config import LlamaConfig
from jaxpost.models.heads import LlamaForScore
from jaxpost.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)
HEADS = ("lm", "score")
MAX_SHARD_BYTES = 5 * 1024**3


@dataclasses.dataclass
class LoadedModel:
  """What `load_model` returns: `model.apply({"params": params}, input_ids, attention_mask=...)`."""
  model: Any
  params: Any
  tokenizer: Any
  config: LlamaConfig
  head: str = "lm"
  source: Optional[str] = None


def build_module(config: LlamaConfig, head: str = "lm"):
  if head not in HEADS:
    raise ValueError(f"Unknown head {head!r}; choose one of {HEADS}")
  return LlamaForCausalLM(config) if head == "lm" else LlamaForScore(config)


def resolve_model_dir(name_or_path: str) -> Path:
  """A local directory for a bundled name, a local path or a hub id (downloaded)."""
  if name_or_path.startswith("bundled:"):
    from jaxpost.bundled import bundled_dir
    return bundled_dir(name_or_path[len("bundled:"):])
  path = Path(name_or_path).expanduser()
  if path.exists():
    if not path.is_dir():
      raise NotADirectoryError(f"{path} is not a model directory")
    return path
  if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
    raise FileNotFoundError(f"No model directory at {name_or_path!r} (and it is not a hub id "
                            "'org/name' or 'bundled:<name>').")
  from huggingface_hub import snapshot_download
  return Path(snapshot_download(
      name_or_path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))


def read_hf_config(model_dir: Path) -> dict:
  path = Path(model_dir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{model_dir}: no config.json (not an HF model directory)")
  return json.loads(path.read_text())


def load_model(name_or_path: str, dtype: str = "float32", param_dtype: Optional[str] = None,
               head: str = "lm", scan_layers: bool = True, remat_policy: str = "none",
               shardings=None, tokenizer: bool = True, seed: int = 0) -> LoadedModel:
  """Loads an HF checkpoint as a jaxpost model.

  Args:
    name_or_path: local HF dir, hub id, or `bundled:smollm2-135m-instruct`.
    dtype: compute dtype; param_dtype: storage dtype of the weights (defaults to `dtype`).
    head: "lm" (causal LM) or "score" (scalar head: reward model / critic). A score head that
      the checkpoint lacks (a causal-LM checkpoint) starts as N(0, 0.02^2) from `seed`.
    shardings: optional pytree of `jax.sharding.Sharding` matching the params; each tensor is
      placed directly with it.
  """
  model_dir = resolve_model_dir(name_or_path)
  hf_config = read_hf_config(model_dir)
  config = LlamaConfig.from_hf(hf_config, dtype=dtype, param_dtype=param_dtype or dtype,
                               scan_layers=scan_layers, remat_policy=remat_policy)
  module = build_module(config, head)
  params = load_params(model_dir, module, config, shardings, seed)
  tok = load_tokenizer(model_dir) if tokenizer else None
  return LoadedModel(module, params, tok, config, head, str(name_or_path))


def has_score_head(name_or_path: str) -> bool:
  """Whether the checkpoint holds a trained scalar head (`score.weight`: a reward model)."""
  return SafetensorsReader(resolve_model_dir(name_or_path)).has("score.weight")


def load_tokenizer(model_dir: Path):
  from transformers import AutoTokenizer
  if not any((Path(model_dir) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
    log.warning("%s has no tokenizer files; LoadedModel.tokenizer is None", model_dir)
    return None
  tok = AutoTokenizer.from_pretrained(str(model_dir))
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  return tok


def load_params(model_dir: Path, module, config: LlamaConfig, shardings=None, seed: int = 0):
  """Reads the params `module` expects from the safetensors in `model_dir`."""
  reader = SafetensorsReader(model_dir)
  expected = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  expected = traverse_util.flatten_dict(meta.unbox(expected))
  flat_shardings = (traverse_util.flatten_dict(shardings) if shardings is not None else {})
  loaded = {}
  for path, spec in expected.items():
    if path == ("score", "kernel") and not reader.has("score.weight"):
      log.warning("%s has no score head; initialising it N(0, 0.02^2)", model_dir)
      value = 0.02 * np.asarray(jax.random.normal(jax.random.PRNGKey(seed), spec.shape))
    else:
      value = _read_param(reader, path, spec, config.scan_layers)
    loaded[path] = _place(value.astype(spec.dtype), flat_shardings.get(path))
  return traverse_util.unflatten_dict(loaded)


def _place(value: np.ndarray, sharding):
  if sharding is None:
    return jnp.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _read_param(reader, path, spec, scanned: bool) -> np.ndarray:
  if scanned and "layers" in path:
    out = np.empty(spec.shape, dtype=spec.dtype)
    for i in range(spec.shape[0]):
      out[i] = _read_one(reader, hf_name(path, i), path, spec.shape[1:], spec.dtype)
    return out
  return _read_one(reader, hf_name(path), path, spec.shape, spec.dtype)


def _read_one(reader, name, path, shape, dtype) -> np.ndarray:
  tensor = reader.get(name)
  transpose = path[-1] == "kernel"
  expected = tuple(shape)[::-1] if transpose else tuple(shape)
  if tuple(tensor.shape) != expected:
    raise ValueError(f"{reader.model_dir}: tensor {name} has shape {tuple(tensor.shape)}, "
                     f"the config implies {expected}")
  return np.asarray(tensor.T if transpose else tensor, dtype=dtype)


def hf_name(path, layer: Optional[int] = None) -> str:
  """HF tensor name of a flax param path (`layer` for the scanned layout)."""
  parts = []
  for p in path[:-1]:
    if p == "layers":
      parts += ["layers", str(layer)]
    elif p.startswith("layers_"):
      parts += ["layers", p[len("layers_"):]]
    else:
      parts.append(p)
  parts.append("bias" if path[-1] == "bias" else "weight")
  return ".".join(parts)


class SafetensorsReader:
  """Memory-mapped access to the tensors of `model.safetensors` or a sharded index."""

  def __init__(self, model_dir: Path):
    from safetensors import safe_open
    self.model_dir = Path(model_dir)
    index = self.model_dir / "model.safetensors.index.json"
    single = self.model_dir / "model.safetensors"
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    elif single.exists():
      files = ["model.safetensors"]
    else:
      raise FileNotFoundError(
          f"{self.model_dir}: no model.safetensors or model.safetensors.index.json "
          "(only safetensors checkpoints are supported)")
    self._handles = {f: safe_open(str(self.model_dir / f), "np") for f in files}
    self._where = {k: f for f, h in self._handles.items() for k in h.keys()}

  def has(self, name: str) -> bool:
    return name in self._where

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise KeyError(f"{self.model_dir}: tensor {name!r} not found in the checkpoint")
    return self._handles[self._where[name]].get_tensor(name)


# ------------------------------------------------------------------------------------ export


def params_to_hf(params, config: LlamaConfig):
  """Yields (HF name, numpy array) for every parameter, unstacking scanned layers."""
  for path, value in traverse_util.flatten_dict(params).items():
    value = np.asarray(jax.device_get(value))
    transpose = path[-1] == "kernel"
    if config.scan_layers and "layers" in path:
      for i in range(value.shape[0]):
        yield hf_name(path, i), (value[i].T if transpose else value[i])
    else:
      yield hf_name(path), (value.T if transpose else value)


def save_model(lm: LoadedModel, out_dir: str, dtype: Optional[str] = None,
               max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
  """Writes an HF directory that `transformers.AutoModelFor*.from_pretrained` loads.

  A causal LM saves as `<Family>ForCausalLM`; a score-head model as
  `<Family>ForSequenceClassification` with num_labels=1 and a `score.weight`. LoRA adapters in
  the tree are merged into their kernels first (W + alpha/r A B; models/lora.py).
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  save_dtype = np.dtype(dtype or lm.config.param_dtype)
  params = lm.params
  if lora.has_adapters(params):
    params = lora.merge(params, lm.config.lora_alpha)
  tensors = {name: np.ascontiguousarray(np.asarray(value).astype(save_dtype))
             for name, value in params_to_hf(params, lm.config)}
  _write_safetensors(tensors, out, max_shard_bytes)
  hf = lm.config.to_hf()
  family = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
  suffix = "ForCausalLM" if lm.head == "lm" else "ForSequenceClassification"
  hf["architectures"] = [family[lm.config.model_type] + suffix]
  hf["torch_dtype"] = save_dtype.name
  tokenizer = lm.tokenizer
  if lm.head == "score":
    hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    tokenizer = score_tokenizer(tokenizer, lm.config)
    if tokenizer is not None:
      hf["pad_token_id"] = tokenizer.pad_token_id
  (out / "config.json").write_text(json.dumps(hf, indent=2))
  if lm.head == "lm":
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(out))
  return out


def score_tokenizer(tokenizer, config: LlamaConfig):
  """A copy of `tokenizer` whose pad token can never be a scored row's last real token.

  transformers' `*ForSequenceClassification` scores the rightmost token whose id is not
  `pad_token_id` (it ignores attention_mask); jaxpost scores the last attention-mask token
  (models/heads.py). The two agree on any batch, left or right padded, when the pad id is never
  a row's last real token, so it may not be an EOS (every standard row ends in one), the BOS or
  a token of the chat template. The first token that is none of these among: the tokenizer's own
  pad token, special tokens named like a pad, the unk token, any other special token; else a new
  `<|pad|>` in the unused embedding rows (ids len(tokenizer) .. vocab_size - 1), so the
  vocabulary never grows. The caller's tokenizer is not changed.
  """
  if tokenizer is None:
    if config.pad_token_id is not None and config.pad_token_id in _ids(config.eos_token_id):
      log.warning("Exporting a score model without a tokenizer whose pad_token_id is the EOS: "
                  "transformers will score the token before a trailing EOS")
    return None
  tokenizer = copy.deepcopy(tokenizer)
  template = str(getattr(tokenizer, "chat_template", None) or "")
  used = _ids(config.eos_token_id) | _ids(tokenizer.eos_token_id) | _ids(tokenizer.bos_token_id)
  specials = [t.content for i, t in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items())
              if t.special]
  candidates = ([tokenizer.pad_token] + [t for t in specials if "pad" in t.lower()]
                + [tokenizer.unk_token] + specials)
  for token in candidates:
    if token and token not in template and tokenizer.convert_tokens_to_ids(token) not in used:
      tokenizer.pad_token = token
      return tokenizer
  if len(tokenizer) >= config.vocab_size:
    raise ValueError(
        "Cannot export the score model for transformers: its tokenizer has no special token "
        "besides EOS/BOS/chat-template tokens to pad with and no unused embedding row; set "
        "tokenizer.pad_token to a token that never occurs in your rows")
  tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
  return tokenizer


def _ids(value) -> set:
  """A token id or a sequence of ids (config.eos_token_id may be a list) as a set."""
  if value is None:
    return set()
  return set(value) if isinstance(value, (list, tuple)) else {value}


def _write_safetensors(tensors: dict, out: Path, max_shard_bytes: int):
  from safetensors.numpy import save_file
  for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
    stale.unlink()
  shards, current, size = [], {}, 0
  for name, value in tensors.items():
    if current and size + value.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = value
    size += value.nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(out / fname), metadata={"format": "pt"})
    weight_map.update({name: fname for name in shard})
  total = sum(v.nbytes for v in tensors.values())
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ------------------------------------------------------------------------- PEFT adapter export


def peft_tensors(adapters, scanned: bool) -> dict[str, np.ndarray]:
  """PEFT state-dict names and [r, in] / [out, r] arrays of every adapter (layers unstacked):
  `base_model.model.<module>.lora_A.weight` = A^T, `...lora_B.weight` = B^T."""
  tensors = {}
  for path, value in traverse_util.flatten_dict(adapters).items():
    if path[-1] not in lora.ADAPTER_LEAVES:
      raise ValueError(f"PEFT export holds LoRA adapters only; {'/'.join(path)} is trained in "
                       "full (use config.lora.export='merged')")
    value = np.asarray(jax.device_get(value), np.float32)
    suffix = "lora_A" if path[-1] == "lora_a" else "lora_B"
    kernel_path = path[:-1] + ("kernel",)
    layers = range(value.shape[0]) if scanned and "layers" in path else [None]
    for layer in layers:
      weight = value if layer is None else value[layer]
      name = hf_name(kernel_path, layer)[:-len("weight")] + f"{suffix}.weight"
      tensors["base_model.model." + name] = np.ascontiguousarray(weight.T)
  return tensors


def save_peft_adapter(adapters, spec: lora.LoraSpec, scanned: bool, out_dir,
                      base_model: str = "") -> Path:
  """Writes `adapter_config.json` + `adapter_model.safetensors` (PEFT's LoRA layout, causal LM)."""
  from safetensors.numpy import save_file
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tensors = peft_tensors(adapters, scanned)
  modules = sorted({name[len("base_model.model."):].rsplit(".lora_", 1)[0] for name in tensors})
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
      "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
      "use_rslora": False, "init_lora_weights": True, "modules_to_save": None,
      "inference_mode": True,
  }
  (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
  save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
  return out
