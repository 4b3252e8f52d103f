"""Typed model configuration for the Llama family, built from a Hugging Face `config.json`.

One dataclass covers Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3 and SmolLM/SmolLM2: they differ
only in flags (q/k/v bias, q/k RMSNorm, tied embeddings, RoPE scaling, sliding window).
Architecture fields mirror HF names; `dtype`, `param_dtype`, `scan_layers`, `remat_policy` and
the LoRA scale/dropout are runtime choices that never change the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")  # compute and parameter dtypes


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture (HF names) plus runtime options of a Llama-family decoder."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  sliding_window: Optional[int] = None
  model_type: str = "llama"
  bos_token_id: Optional[int] = None
  eos_token_id: Any = None
  pad_token_id: Optional[int] = None
  # Runtime options (not part of the checkpoint).
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  lora_alpha: float = 16.0  # LoRA scale alpha / r and adapter-input dropout, used only when
  lora_dropout: float = 0.0  # the parameter tree holds adapters (models/lora.py)

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"Unsupported rope_type {self.rope_type!r}; supported: {ROPE_TYPES}")
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in DTYPES:
        raise ValueError(f"Unknown {key} {getattr(self, key)!r}; choose one of {DTYPES}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f"Unknown remat_policy {self.remat_policy!r}; choose one of {REMAT_POLICIES}")

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **runtime) -> "LlamaConfig":
    """Builds the config from a parsed HF `config.json` dict; `runtime` sets dtype etc."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"Unsupported model_type {model_type!r}; jaxpost supports {SUPPORTED_MODEL_TYPES} "
          "(SmolLM/SmolLM2 are model_type 'llama').")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"Unsupported hidden_act {act!r}; the Llama family uses 'silu'.")
    heads = hf["num_attention_heads"]
    rope = _rope_fields(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    sliding = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
      sliding = None
    return cls(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias or model_type == "qwen2",
        o_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding,
        model_type=model_type,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_hashable(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        **rope,
        **runtime,
    )

  def to_hf(self) -> dict:
    """The HF `config.json` fields for this architecture (transformers >= 4.45 reads them)."""
    hf = {
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": self._hf_rope_scaling(),
        "tie_word_embeddings": self.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                        else self.eos_token_id,
        "pad_token_id": self.pad_token_id,
    }
    if self.model_type != "qwen2":
      hf["attention_bias"] = self.o_bias or self.qkv_bias
    if self.model_type == "llama":
      hf["mlp_bias"] = self.mlp_bias
    if self.sliding_window is not None:
      hf["sliding_window"] = self.sliding_window
      if self.model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = True
    return hf

  def _hf_rope_scaling(self) -> Optional[dict]:
    if self.rope_type == "default":
      return None
    scaling = {"rope_type": self.rope_type, "factor": self.rope_factor}
    if self.rope_type == "llama3":
      scaling.update(
          low_freq_factor=self.rope_low_freq_factor,
          high_freq_factor=self.rope_high_freq_factor,
          original_max_position_embeddings=self.rope_original_max_position_embeddings)
    return scaling



def forward_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
  """Forward FLOPs per token: 2 x (matmul weights incl. the LM head) + attention scores and
  values, 4 * layers * seq_len * heads * head_dim (the full T x T product, as executed).
  A training step costs 3x this (forward + backward)."""
  d, f, h, kv, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                     cfg.num_key_value_heads, cfg.head_dim)
  matmul_weights = cfg.num_hidden_layers * (d * hd * (2 * h + 2 * kv) + 3 * d * f)
  matmul_weights += cfg.vocab_size * d
  attention = 4 * cfg.num_hidden_layers * seq_len * h * hd
  return 2 * matmul_weights + attention


def _rope_fields(hf: Mapping[str, Any]) -> dict:
  """Reads RoPE settings from either `rope_scaling` (transformers 4.x) or `rope_parameters`."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_type = params.get("rope_type", params.get("type", "default"))
  fields = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
            "rope_type": rope_type}
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"Unsupported RoPE scaling {rope_type!r}; supported: {ROPE_TYPES}")
  if rope_type in ("linear", "llama3"):
    fields["rope_factor"] = float(params["factor"])
  if rope_type == "llama3":
    fields["rope_low_freq_factor"] = float(params["low_freq_factor"])
    fields["rope_high_freq_factor"] = float(params["high_freq_factor"])
    fields["rope_original_max_position_embeddings"] = int(
        params["original_max_position_embeddings"])
  return fields


def _hashable(value):
  return tuple(value) if isinstance(value, list) else value
