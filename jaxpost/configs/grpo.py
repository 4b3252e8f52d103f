"""GRPO and its family (algorithm "grpo"; math in jaxpost/losses/grpo.py, glue in
jaxpost/algos/grpo.py).

    python scripts/train.py --config=configs/grpo.py              # bundled SmolLM2, arithmetic
    python scripts/train.py --config=configs/grpo.py:dapo         # DAPO: clip-higher, dynamic
                                                                  # sampling, overlong shaping
    python scripts/train.py --config=configs/grpo.py:dr_grpo      # Dr. GRPO: no std scaling
    python scripts/train.py --config=configs/grpo.py:lora         # LoRA adapters
    python scripts/train.py --config=configs/grpo.py:tiny         # tiny random model (CI)
    python scripts/train.py --config=configs/grpo.py --config.reward.funcs=my_rewards.py:fn

The default samples G = 8 answers (temperature 0.7) to each of 8 built-in arithmetic prompts per
iteration for 20 iterations (full finetuning, constant learning rate 1e-5),
rewards each with the arithmetic verifier (1 when the final number is right) and reports held-out
greedy accuracy before and after. `batch_size` counts PROMPTS (R = batch_size x G rows per
iteration); one loop step is one iteration of num_iterations x num_minibatches updates.
"""

import ml_collections

from jaxpost.configs import base, sft
from jaxpost.configs.keys import doc_block
from jaxpost.losses.grpo import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, SCALE_REWARDS

ROLLOUT_KEYS = {
    "rollout.max_new_tokens": "completion tokens sampled per answer (TRL max_completion_length)",
    "rollout.temperature": "sampling temperature (0: greedy); log-probs use logits / T",
    "rollout.top_k": "sample among the k most likely tokens (0: off)",
    "rollout.top_p": "nucleus sampling mass (1: off)",
    "reward.funcs": "reward functions, comma-separated: builtin:<task>, path/file.py:fn, "
                    "module:fn (TRL signature fn(prompts, completions, **columns))",
    "reward.weights": "one weight per reward function (None: 1 each)",
    "reward.model": '"" or a head="score" checkpoint dir (e.g. runs/rm/hf) scored in-graph',
    "reward.model_weight": "weight of the reward model's score in the total reward",
    "ref.name_or_path": 'reference checkpoint for the KL term; "" = the initial policy (loaded '
                        "only when beta > 0)",
}
KEYS = {
    "grpo.num_generations": "G completions per prompt (>= 2)",
    "grpo.beta": "k3 KL coefficient against the reference (0: no reference is loaded)",
    "grpo.epsilon": "lower clip ε_low of the ratio",
    "grpo.epsilon_high": "upper clip ε_high (None: = epsilon; DAPO 0.28)",
    "grpo.num_iterations": "μ: updates on one rollout (> 1 makes the ratio move and clip)",
    "grpo.num_minibatches": "minibatches each pass over the rollout is split into",
    "grpo.loss_type": " | ".join(LOSS_TYPES),
    "grpo.scale_rewards": " | ".join(SCALE_REWARDS) + ": the std dividing the advantages",
    "grpo.importance_sampling_level": " | ".join(IMPORTANCE_SAMPLING_LEVELS)
                                      + " (sequence: GSPO)",
    "grpo.use_bias_correction_kl": "weight the k3 term by the ratio (TRL 1.16's default)",
    "grpo.mask_truncated_completions": "no loss on completions that hit max_new_tokens",
    "grpo.dynamic_sampling": "DAPO: mask groups whose rewards are all equal (over-generate by "
                             "raising batch_size)",
    "grpo.overlong_buffer": "DAPO overlong shaping: linear penalty over the last this many tokens "
                            "(0: off)",
    **ROLLOUT_KEYS,
}
__doc__ += doc_block(KEYS, "Keys added to configs/base.py")

VARIANTS = ("default", "dapo", "dr_grpo", "lora", "tiny")


def rollout_keys(c, max_new_tokens: int = 16):
  """The rollout, reward and reference keys shared by grpo and rloo."""
  c.rollout = ml_collections.ConfigDict({"max_new_tokens": max_new_tokens, "temperature": 0.7,
                                         "top_k": 0, "top_p": 1.0})
  c.reward = ml_collections.ConfigDict({"funcs": "builtin:arithmetic", "model": "",
                                        "model_weight": 1.0})
  c.reward.weights = ml_collections.FieldReference(None, field_type=object)
  c.ref = ml_collections.ConfigDict({"name_or_path": ""})


def rollout_run(c, algorithm: str):
  """Shared run shape of the rollout recipes on the bundled model and arithmetic prompts."""
  c.algorithm = algorithm
  c.workdir = f"runs/{algorithm}"
  c.data.train = "builtin:arithmetic"
  c.data.task_kind = "prompt"
  c.data.max_length = 64  # prompt tokens (the chat template's system prompt included)
  c.batch_size = 4
  # Microbatches of the update (same math: accumulation is exact for every loss type): on the
  # bundled model, 4 x 8 rows instead of 32 at once take ~half the update time and a third of
  # the memory on a 2-core CPU (BENCHMARKS.md, GRPO).
  c.grad_accum = 4
  c.max_steps = 20
  c.log_every = 1
  c.checkpoint.every = 10
  c.optimizer.learning_rate = 1e-5
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = "constant"
  c.optimizer.weight_decay = 0.0
  c.report.examples = 128
  c.report.max_new_tokens = 16
  c.export_hf = "hf"


def tiny(c, algorithm: str):
  sft._tiny(c)
  c.workdir = f"runs/{algorithm}_tiny"
  c.max_steps = 4
  c.batch_size = 4
  c.grad_accum = 1
  c.rollout.max_new_tokens = 6
  c.export_hf = ""


def get_config(arg=None):
  c = base.get_config()
  rollout_run(c, "grpo")
  c.batch_size = 8  # prompts: 0.102 -> 0.281 held-out accuracy vs 0.227 with 4 (README)
  c.max_steps = 40  # 12.6 min on 2 CPU cores: 0.102 -> 0.289 (README)
  c.grpo = ml_collections.ConfigDict({
      "num_generations": 8, "beta": 0.0, "epsilon": 0.2, "num_iterations": 1,
      "num_minibatches": 1, "loss_type": "dapo", "scale_rewards": "group",
      "importance_sampling_level": "token", "use_bias_correction_kl": True,
      "mask_truncated_completions": False, "dynamic_sampling": False, "overlong_buffer": 0})
  c.grpo.epsilon_high = ml_collections.FieldReference(None, field_type=float)
  rollout_keys(c)
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"configs/grpo.py: unknown variant {variant!r}; choose one of {VARIANTS}")
  if variant == "dapo":  # Yu et al. 2025
    c.workdir = "runs/grpo_dapo"
    c.grpo.epsilon_high = 0.28
    c.grpo.dynamic_sampling = True
    c.grpo.overlong_buffer = 4
    c.grpo.mask_truncated_completions = True
  if variant == "dr_grpo":  # Liu et al. 2025
    c.workdir = "runs/grpo_dr"
    c.grpo.loss_type, c.grpo.scale_rewards = "dr_grpo", "none"
  if variant == "lora":
    sft.lora(c, learning_rate=2e-5)
  if variant == "tiny":
    tiny(c, "grpo")
    c.grpo.num_generations = 4
  return c
