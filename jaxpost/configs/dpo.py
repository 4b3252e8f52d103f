"""Direct preference optimisation and its family (algorithm "dpo"; math in jaxpost/losses/dpo.py).

    python scripts/train.py --config=configs/dpo.py                 # bundled SmolLM2, arithmetic
    python scripts/train.py --config=configs/dpo.py --config.loss_type=ipo --config.beta=0.5
    python scripts/train.py --config=configs/dpo.py:kto             # unpaired rows, KTO
    python scripts/train.py --config=configs/dpo.py:lora            # LoRA; reference = adapters off
    python scripts/train.py --config=configs/dpo.py:tiny            # tiny random model, DPO (CI)

The default trains the bundled SmolLM2-135M-Instruct on the built-in arithmetic task's on-policy
pairs (`data.task_kind="onpolicy"`: the model's own samples, chosen = one the verifier passes,
rejected = one it fails; jaxpost/data/tasks) with the RPO objective (DPO + the chosen NLL,
`sft_weight=1`; Pang et al. 2024, iterative reasoning preference optimisation) and reports held-out
loss, reward accuracy and greedy task accuracy before and after. `--config.data.task_kind=
preference --config.data.max_length=128` trains on the task's templated pairs instead (chosen:
the concise right answer; rejected: wrong or rambling; `:tiny` trains on them, `:kto` on their
unpaired form).
"""

import ml_collections

from jaxpost.configs import base, sft
from jaxpost.configs.keys import doc_block
from jaxpost.losses.dpo import LOSS_TYPES

KEYS = {
    "loss_type": " | ".join(LOSS_TYPES) + " (jaxpost/losses/dpo.py; kto needs algorithm kto)",
    "beta": "β (τ for ipo, λ for orpo); > 0",
    "label_smoothing": "ε in [0, 0.5): cDPO for sigmoid/simpo, flip rate for robust",
    "simpo_gamma": "SimPO's target margin γ",
    "sft_weight": "RPO: + sft_weight · chosen NLL per token",
    "desirable_weight": "KTO's λ_D (weight of desirable rows)",
    "undesirable_weight": "KTO's λ_U (weight of undesirable rows)",
    "ref.name_or_path": 'reference checkpoint; "" = the initial policy (unused by simpo / orpo)',
    "precompute_ref": "score the training pairs with the reference once, cached in the workdir",
}
__doc__ += doc_block(KEYS, "Keys added to configs/base.py")

VARIANTS = ("default", "kto", "lora", "tiny")


def preference_keys(c):
  c.loss_type = "sigmoid"
  c.beta = 0.1
  c.label_smoothing = 0.0
  c.simpo_gamma = 0.5
  c.sft_weight = 0.0
  c.desirable_weight = 1.0
  c.undesirable_weight = 1.0
  c.ref = ml_collections.ConfigDict({"name_or_path": ""})
  c.precompute_ref = False


def on_policy_rpo(c):
  """The main job's data and objective (module docstring): RPO on the on-policy pairs."""
  c.data.task_kind = "onpolicy"
  c.data.max_length = 64  # prompt 44-50 tokens + 16 sampled; 13 of 152 pairs lose <= 4 end tokens
  c.sft_weight = 1.0
  # 60 steps (3.2 epochs of the 152 pairs) at 5e-5: held-out accuracy 0.125 -> 0.367 in our run;
  # 40 steps at 3e-5 / 5e-5 reached 0.305 / 0.313 (README).
  c.optimizer.learning_rate = 5e-5
  c.max_steps = 60
  c.eval_batches = 2  # the 18 held-out pairs


def get_config(arg=None):
  c = base.get_config()
  c.algorithm = "dpo"
  c.workdir = "runs/dpo"
  preference_keys(c)
  c.data.train = "builtin:arithmetic"
  c.data.max_length = 128
  # Keep matmul outputs, recompute the [B, H, T, T] attention: DPO's 2B-row forward and its
  # reference held 14.9 GB at T=512 without remat (TRL 8.8 GB); BENCHMARKS.md "Memory levers".
  c.model.remat_policy = "dots_no_batch"
  c.batch_size = 8
  c.max_steps = 40
  c.log_every = 5
  c.eval_batches = 4
  c.checkpoint.every = 0
  c.export_hf = "hf"
  c.optimizer.learning_rate = 5e-6
  c.optimizer.warmup_steps = 5
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"configs/dpo.py: unknown variant {variant!r}; choose one of {VARIANTS}")
  if variant in ("default", "lora"):
    on_policy_rpo(c)
  if variant == "kto":
    c.algorithm, c.loss_type, c.workdir = "kto", "kto", "runs/kto"
  if variant == "lora":
    sft.lora(c, learning_rate=5e-5)
  if variant == "tiny":
    sft._tiny(c)
    c.workdir = "runs/dpo_tiny"
    c.export_hf = ""
  return c
