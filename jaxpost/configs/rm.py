"""Bradley–Terry reward model (algorithm "rm"; loss in jaxpost/losses/reward.py).

    python scripts/train.py --config=configs/rm.py          # bundled SmolLM2 + scalar head
    python scripts/train.py --config=configs/rm.py:tiny     # tiny random model (CI)

The backbone is any causal-LM checkpoint with a new scalar head (`head="score"`) read at each
sequence's last real token. The default trains on the built-in arithmetic task's ranked rows
(k = 3 responses per prompt -> 3 pairs, margin = score difference) and reports held-out pair
accuracy before and after; the result exports as an HF LlamaForSequenceClassification dir,
loadable again with `jaxpost.load_model(path, head="score")`. Your own pairs:
`--config.data.train=pairs.jsonl` (prompt/chosen/rejected rows, or any preference format; a
`margin` column is used as TRL's RewardTrainer does: loss -log σ(r_c - r_r - margin)).
"""

from jaxpost.configs import base, sft
from jaxpost.configs.keys import doc_block

KEYS = {"center_rewards_coefficient": "c in the loss term + c · mean((r_c + r_r)²); 0 disables it"}
__doc__ += doc_block(KEYS, "Keys added to configs/base.py")

VARIANTS = ("default", "tiny")


def get_config(arg=None):
  c = base.get_config()
  c.algorithm = "rm"
  c.workdir = "runs/rm"
  c.center_rewards_coefficient = 0.0
  c.data.train = "builtin:arithmetic"
  c.data.task_kind = "ranked"  # builtin rows: k responses + scores -> pairs with margins
  c.data.max_length = 128
  c.batch_size = 8
  c.max_steps = 60
  c.log_every = 5
  c.eval_batches = 4
  c.checkpoint.every = 0
  c.export_hf = "hf"
  c.optimizer.learning_rate = 1e-5
  c.optimizer.warmup_steps = 5
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"configs/rm.py: unknown variant {variant!r}; choose one of {VARIANTS}")
  if variant == "tiny":
    sft._tiny(c)
    c.workdir = "runs/rm_tiny"
    c.export_hf = ""
  return c
