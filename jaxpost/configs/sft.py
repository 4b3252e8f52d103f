"""Supervised finetuning (algorithm "sft", loss in jaxpost/losses/sft.py).

    python scripts/train.py --config=configs/sft.py            # bundled SmolLM2, arithmetic task
    python scripts/train.py --config=configs/sft.py:lora       # LoRA r=16 on every projection
    python scripts/train.py --config=configs/sft.py:tiny       # tiny random model (CI)
    python scripts/train.py --config=configs/sft.py:synthetic  # tiny model, random tokens (tests)

The default finetunes the bundled SmolLM2-135M-Instruct on the built-in arithmetic task in a few
minutes on 2 CPU cores and prints the eval loss before and after.
"""

from jaxpost.configs import base
from jaxpost.configs.keys import doc_block

KEYS = {"neftune_alpha": "NEFTune noise scale (Jain et al. 2023) on the input embeddings in "
                         "training; 5 is the paper's usual value, 0 disables it"}
__doc__ += doc_block(KEYS, "Keys added to configs/base.py")

VARIANTS = ("default", "lora", "tiny", "synthetic")


def get_config(arg=None):
  c = base.get_config()
  c.algorithm = "sft"
  c.workdir = "runs/sft"
  c.neftune_alpha = 0.0
  c.data.train = "builtin:arithmetic"
  c.data.max_length = 96
  c.batch_size = 8
  c.max_steps = 40
  c.log_every = 5
  c.eval_batches = 4
  c.checkpoint.every = 0
  c.optimizer.learning_rate = 5e-5
  c.optimizer.warmup_steps = 4
  variant = arg or "default"
  if variant == "lora":
    lora(c, learning_rate=2e-4)
  if variant in ("tiny", "synthetic"):
    _tiny(c)
  if variant == "synthetic":
    _synthetic(c)
  elif variant not in VARIANTS:
    raise ValueError(f"configs/sft.py: unknown variant {variant!r}; choose one of {VARIANTS}")
  return c


def lora(c, learning_rate: float, rank: int = 16):
  """LoRA (models/lora.py) on every attention and MLP projection: the base stays frozen, only
  the adapters (~3% of SmolLM2's weights at r=16) are trained, at a higher learning rate."""
  c.workdir += "_lora"
  c.lora.rank = rank
  c.lora.alpha = 2.0 * rank
  c.optimizer.learning_rate = learning_rate


def _tiny(c):
  """A 2-layer, 64-wide random Llama with the bundled tokenizer: seconds per run on a CPU."""
  c.workdir = "runs/sft_tiny"
  c.model.random_init = True
  c.model.overrides.hidden_size = 64
  c.model.overrides.intermediate_size = 128
  c.model.overrides.num_hidden_layers = 2
  c.model.overrides.num_attention_heads = 4
  c.model.overrides.num_key_value_heads = 2
  c.model.overrides.head_dim = 16
  c.max_steps = 20
  c.eval_batches = 2
  c.report.examples, c.report.max_new_tokens = 8, 4
  c.optimizer.learning_rate = 1e-3


def _synthetic(c):
  """The tiny model with a 256-token vocabulary on random-token rows: no tokenizer or files."""
  c.workdir = "runs/sft_synthetic"
  c.model.name_or_path = ""
  c.model.overrides.vocab_size = 256
  c.data.train = "synthetic"
  c.data.eval = "synthetic"
  c.report.task = ""
  c.data.max_length = 32
