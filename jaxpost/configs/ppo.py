"""PPO-RLHF with a trained critic (algorithm "ppo"; math in jaxpost/losses/ppo.py, glue in
jaxpost/algos/ppo.py).

    python scripts/train.py --config=configs/ppo.py               # bundled SmolLM2, arithmetic
    python scripts/train.py --config=configs/ppo.py --config.reward.model=runs/rm/hf \\
        --config.reward.funcs=""                                  # against a reward model
    python scripts/train.py --config=configs/ppo.py:lora          # LoRA policy, full critic
    python scripts/train.py --config=configs/ppo.py:shared_critic # value head on the policy trunk
    python scripts/train.py --config=configs/ppo.py:tiny          # tiny random model (CI)

One sample per prompt (ppo.num_generations = 1, as TRL's PPOTrainer), a per-token reward of
−β KL_t (k1 against the initial policy) plus the score at the last token, GAE (γ = 1, λ = 0.95),
4 epochs of the clipped surrogate and the clipped value loss (vf_coef 0.1): TRL's experimental
PPO defaults. The critic starts from `critic.name_or_path`, else from `reward.model`, else from
the policy's weights with a zero scalar head, and has its own learning rate and clipping
(`critic.optimizer.*`). `state.params = {"policy", "value"}`; the export is the policy.
"""

import ml_collections

from jaxpost.configs import base, grpo, sft
from jaxpost.configs.keys import doc_block

KEYS = {
    "ppo.num_generations": "samples per prompt (rows per iteration = batch_size x this)",
    "ppo.num_epochs": "passes over each rollout (TRL num_ppo_epochs)",
    "ppo.num_minibatches": "minibatches each pass is split into (TRL num_mini_batches)",
    "ppo.gamma": "discount γ of GAE",
    "ppo.lam": "λ of GAE",
    "ppo.cliprange": "ε of the clipped ratio",
    "ppo.cliprange_value": "ε_v: values clipped to V_old ± ε_v in the value loss",
    "ppo.vf_coef": "weight of the value loss in the one backward",
    "ppo.ent_coef": "weight c_H of the entropy bonus − c_H · mean H (0: off, as TRL)",
    "ppo.kl_coef": "β of the per-token −β KL_t reward (initial value when adaptive)",
    "ppo.kl_estimator": "k1 | k3",
    "ppo.kl_target": "None: fixed β; else the adaptive controller's target KL (nats per "
                     "sequence, Ziegler et al. 2019)",
    "ppo.kl_horizon": "the adaptive controller's horizon (samples)",
    "ppo.whiten_rewards": "whiten the per-token rewards (mean kept) before GAE",
    "ppo.missing_eos_penalty": "None or a score penalty for completions without EOS",
    "ppo.reward_clip": "None or clip the (penalised) score to ± this",
    "ppo.dual_clip": "None or the dual-clip constant c > 1 for negative advantages",
    "critic.name_or_path": '"" = reward.model if set, else the policy with a fresh score head',
    "critic.share_backbone": "True: the critic is a score head on the policy's trunk (one "
                             "forward for logits and values; the value loss trains the trunk too)",
    "critic.warmup_steps": "first iterations that train the critic alone (policy term off)",
    "critic.optimizer.learning_rate": "the critic's learning rate (config.optimizer otherwise)",
    "critic.optimizer.max_grad_norm": "the critic's gradient clipping (0: off)",
    **grpo.ROLLOUT_KEYS,
}
__doc__ += doc_block(KEYS, "Keys added to configs/base.py")

VARIANTS = ("default", "lora", "shared_critic", "tiny")


def get_config(arg=None):
  c = base.get_config()
  grpo.rollout_run(c, "ppo")
  # 8 prompts x 24 iterations: 20.5 min on a 2-core CPU (2026-12-03, layers still scanned),
  # held-out accuracy 0.10 -> 0.20 (README)
  c.batch_size = 8
  c.max_steps = 24
  # Unrolled layers: on CPU each iteration's 4 epochs of two models' forward and backward run
  # ~20% faster than under lax.scan (no per-layer weight slices, stacked-gradient updates or
  # zeroed stacks; benchmarks/ppo.py), for 20-45 s more compilation on the bundled model.
  c.model.scan_layers = False
  # One microbatch: at 8 rows each accumulated microbatch costs more passes over both members'
  # weights than it saves (benchmarks/ppo.py, 2 CPU cores: update 18.2 s at 1 vs 20.1 s at 2).
  c.grad_accum = 1
  c.ppo = ml_collections.ConfigDict({
      "num_generations": 1, "num_epochs": 4, "num_minibatches": 1, "gamma": 1.0, "lam": 0.95,
      "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "ent_coef": 0.0, "kl_coef": 0.05,
      "kl_estimator": "k1", "kl_horizon": 10000.0, "whiten_rewards": False})
  for key in ("kl_target", "missing_eos_penalty", "reward_clip", "dual_clip"):
    c.ppo[key] = ml_collections.FieldReference(None, field_type=float)
  c.critic = ml_collections.ConfigDict({"name_or_path": "", "share_backbone": False,
                                        "warmup_steps": 0})
  c.critic.optimizer = ml_collections.ConfigDict({"learning_rate": 3e-5, "max_grad_norm": 1.0})
  grpo.rollout_keys(c)
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"configs/ppo.py: unknown variant {variant!r}; choose one of {VARIANTS}")
  if variant == "lora":
    sft.lora(c, learning_rate=2e-5)
  if variant == "shared_critic":
    c.workdir = "runs/ppo_shared_critic"
    c.critic.share_backbone = True
  if variant == "tiny":
    grpo.tiny(c, "ppo")
    c.model.scan_layers = True  # 2 layers: nothing to gain; the tests' seeds are of this layout
    c.ppo.num_epochs = 2
    c.critic.optimizer.learning_rate = 1e-3
  return c
