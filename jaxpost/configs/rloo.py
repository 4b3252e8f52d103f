"""REINFORCE leave-one-out (algorithm "rloo", Ahmadian et al. 2024; math in
jaxpost/losses/grpo.py, glue in jaxpost/algos/grpo.py).

    python scripts/train.py --config=configs/rloo.py              # bundled SmolLM2, arithmetic
    python scripts/train.py --config=configs/rloo.py:lora
    python scripts/train.py --config=configs/rloo.py:tiny         # tiny random model (CI)

Each prompt's G samples baseline each other: A_i = r_i − mean_{j≠i} r_j, with the reward
penalised by β Σ_t k1 against the reference (loaded when beta > 0), and a clipped
sequence-level ratio. Run shape, rollout and reward keys as configs/grpo.py.
"""

import ml_collections

from jaxpost.configs import base, grpo, sft
from jaxpost.configs.keys import doc_block

KEYS = {
    "rloo.num_generations": "G completions per prompt (>= 2)",
    "rloo.beta": "β of the k1 penalty in the reward, against the reference (0: none loaded)",
    "rloo.epsilon": "lower clip of the sequence ratio",
    "rloo.epsilon_high": "upper clip (None: = epsilon)",
    "rloo.num_iterations": "μ: updates on one rollout",
    "rloo.num_minibatches": "minibatches each pass over the rollout is split into",
    "rloo.normalize_advantages": "whiten the advantages over the batch (TRL's option)",
    **grpo.ROLLOUT_KEYS,
}
__doc__ += doc_block(KEYS, "Keys added to configs/base.py")

VARIANTS = ("default", "lora", "tiny")


def get_config(arg=None):
  c = base.get_config()
  grpo.rollout_run(c, "rloo")
  c.rloo = ml_collections.ConfigDict({
      "num_generations": 8, "beta": 0.05, "epsilon": 0.2, "num_iterations": 1,
      "num_minibatches": 1, "normalize_advantages": False})
  c.rloo.epsilon_high = ml_collections.FieldReference(None, field_type=float)
  grpo.rollout_keys(c)
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"configs/rloo.py: unknown variant {variant!r}; choose one of {VARIANTS}")
  if variant == "lora":
    sft.lora(c, learning_rate=2e-5)
  if variant == "tiny":
    grpo.tiny(c, "rloo")
    c.rloo.num_generations = 4
  return c
