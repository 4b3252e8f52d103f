"""RLHF in one command (Ouyang et al. 2022, InstructGPT; Touvron et al. 2023, Llama 2 §3):
stage 1 SFT, stage 2 a reward model from ranked comparisons, stage 3 PPO against it.

    python scripts/rlhf.py --config=configs/rlhf.py          # bundled SmolLM2, arithmetic
    python scripts/rlhf.py --config=configs/rlhf.py:tiny     # tiny random model (CI)
    python scripts/rlhf.py --config=configs/rlhf.py --config.sft_model=/path/hf   # own SFT model
    python scripts/rlhf.py --config=configs/rlhf.py --config.stages.rm.data.train=pairs.jsonl

Each stage is a whole recipe under `stages` (configs/sft.py, rm.py, ppo.py: every key of those
is overridable, e.g. `--config.stages.ppo.max_steps=40`) and trains in `<workdir>/<stage>`
(jaxpost/rlhf.py wires them):

    sft   the SFT recipe on its data                       -> <workdir>/sft/hf
    rm    the reward model, initialised from the SFT model -> <workdir>/rm/hf
          (k = 3 ranked responses per built-in prompt -> C(3, 2) pairs with margins)
    ppo   policy and reference = the SFT model, reward.model = the reward model (the critic
          starts from it), no reward functions            -> <workdir>/ppo/hf

A stage whose workdir already holds a checkpoint at its max_steps is skipped, an interrupted
one resumes. `sft_model` / `reward_model` name your own checkpoints instead of stages 1 / 2.
The PPO stage prints the before/after table: the reward model's score and the KL of greedy
held-out rollouts, and held-out task accuracy.
"""

import ml_collections

from jaxpost.configs import ppo, rm, sft

STAGES = ("sft", "rm", "ppo")
VARIANTS = ("default", "tiny")


def get_config(arg=None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"configs/rlhf.py: unknown variant {variant!r}; choose one of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.workdir = "runs/rlhf" if variant == "default" else "runs/rlhf_tiny"
  c.sft_model = ""      # "" = train stage 1; else an HF dir used as the SFT model
  c.reward_model = ""   # "" = train stage 2; else a head="score" HF dir
  tiny = "tiny" if variant == "tiny" else None
  c.stages = ml_collections.ConfigDict({
      "sft": sft.get_config(tiny), "rm": rm.get_config(tiny), "ppo": ppo.get_config(tiny)})
  for stage in ("sft", "rm"):
    c.stages[stage].export_hf = "hf"
  c.stages.ppo.reward.funcs = ""
  if variant == "default":
    c.stages.sft.max_steps = 40
  return c
