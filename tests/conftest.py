"""Shared fixtures: tiny HF checkpoints of each supported family, written by transformers.

Every test process (subprocesses inherit the environment) shares one persistent XLA compilation
cache: the many tiny runs compile the same programs, and a cached program loads in a fraction of
its compile time (a tiny GRPO run: ~50 s -> ~7 s). It changes no result.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "jaxpost-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        rope_theta=500000.0, tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama_linear_bias": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
}


def make_hf_model(family: str, path, seed: int = 0, head: str = "lm", **overrides):
  """Saves a random tiny transformers model of `family` to `path` (`overrides`: config fields
  replacing TINY's); returns the torch model."""
  import torch
  import transformers
  config_cls, model_cls, extra = FAMILIES[family]
  config = getattr(transformers, config_cls)(**{**TINY, **overrides}, **extra, pad_token_id=0, eos_token_id=1,
                                             bos_token_id=2)
  if head == "score":
    model_cls = model_cls.replace("ForCausalLM", "ForSequenceClassification")
    config.num_labels = 1
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():  # make norms and biases non-trivial so a wrong mapping shows
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="session")
def bundled_dir():
  from jaxpost.hf import resolve_model_dir
  return resolve_model_dir("bundled:smollm2-135m-instruct")


def run_on_fake_devices(script: str, devices: int, timeout: int = 600):
  """Runs the Python `script` in a child process with `devices` fake CPU devices (XLA flag),
  this checkout first on the path; asserts it exits 0 and prints OK."""
  import subprocess
  import sys
  from pathlib import Path
  root = Path(__file__).parents[1]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(root))
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        cwd=root, timeout=timeout)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def word_tokenizer(words, specials, pad=None, unk=None, template=None):
  """A word-level fast tokenizer (instant to load): `specials` get ids 0.., then `words`; BOS
  `<s>` and EOS `</s>` must be among `specials`; unknown words map to `unk` (default: the
  first word)."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(list(specials) + list(words))}
  backend = Tokenizer(models.WordLevel(vocab, unk_token=unk or list(words)[0]))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                pad_token=pad, unk_token=unk, chat_template=template)
  tok.add_special_tokens({"additional_special_tokens": [
      s for s in specials if s not in ("<s>", "</s>", pad, unk)]})
  return tok
