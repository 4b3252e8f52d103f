"""Iterated rejection sampling (pipeline "rejection_sampling", jaxpost/pipelines/rejection_sampling.py).

    python scripts/pipeline.py --config=configs/rejection_sampling.py          # bundled SmolLM2,
                                                       # arithmetic verifier, 2 rounds of SFT
    python scripts/pipeline.py --config=configs/rejection_sampling.py:pairs    # best vs worst
                                                       # as DPO rows (iterative DPO)
    python scripts/pipeline.py --config=configs/rejection_sampling.py:tiny     # tiny random model
    python scripts/pipeline.py --config=configs/rejection_sampling.py --config.train_after=False \
        --config.data.train=my_prompts.jsonl --config.reward.funcs=my_rewards.py:score

Each round samples `num_samples` completions of each prompt, scores them (reward functions and/or
a reward model, the keys of the RL recipes), keeps what `selection.mode` says, writes the pool
and finetunes on it with the `train` recipe (configs/sft.py keys under `train.`; `:pairs` uses
configs/dpo.py); the next round samples from that export. `train.<key>` is any key of that
recipe (e.g. `train.optimizer.learning_rate`); its data.train, workdir, model.name_or_path and
export_hf are set per round.
"""

import ml_collections

from jaxpost.configs import dpo, sft
from jaxpost.configs.grpo import ROLLOUT_KEYS
from jaxpost.configs.keys import doc_block
from jaxpost.pipelines import common
from jaxpost.pipelines.rejection_sampling import MODES, POOLS
KEYS = {
    **common.PIPELINE_KEYS, **common.MODEL_KEYS, **common.SAMPLING_KEYS,
    "data.train": "prompt source spec(s): any data.train source with a prompt column (its other "
                  "columns reach the reward functions and the kept rows)",
    "data.task_kind": 'built-in tasks: the kind of rows generated ("prompt")',
    "data.columns": "canonical column name -> the dataset's column name",
    "num_samples": "N completions sampled per prompt",
    "temperatures": "per-round sampling temperatures (None: sampling.temperature every round)",
    "prompts_per_round": "prompts sampled per round, a new slice of data.train each round "
                         "(0: every prompt every round)",
    "selection.mode": " | ".join(MODES) + ": the per-prompt max, the k best, all with reward >= "
                      "min_reward, the distinct completions with reward >= min_reward, or best "
                      "vs worst (ties skipped) as preference rows",
    "selection.k": "top_k: completions kept per prompt; all_correct: at most this many (0: all)",
    "selection.min_reward": "threshold / all_correct: the lowest kept reward; best / top_k: a "
                            "floor when set (None: none)",
    "rounds": "rounds of sample -> select -> train",
    "pool": " | ".join(POOLS) + ": the rows a round trains on",
    "train_after": "finetune after each round (False: stop after generation and selection)",
    "restart_from": '"" (each round trains from the previous round\'s export) or "base" (every '
                    "round trains the base model on its pool)",
    "report.task": 'built-in task whose held-out greedy accuracy is reported per round ("auto": '
                   'the one data.train is drawn from; "": none)',
    "report.examples": "held-out prompts answered per report",
    "report.max_new_tokens": "tokens generated per report answer",
    **{k: v for k, v in ROLLOUT_KEYS.items() if k.startswith("reward.")},
}
__doc__ += doc_block(KEYS)

VARIANTS = ("default", "pairs", "tiny")


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.pipeline = common.pipeline_section("rejection_sampling", batch_size=16)
  c.workdir = "runs/rejection_sampling"
  c.seed = 0
  c.model = common.model_section()
  c.data = common.data_section()
  c.sampling = common.sampling_section(max_new_tokens=16, temperature=0.8)
  c.temperatures = ml_collections.FieldReference(None, field_type=object)
  c.num_samples = 8
  c.prompts_per_round = 32  # 2 rounds x 32 prompts: 14.2 min on 2 CPU cores (README)
  c.selection = ml_collections.ConfigDict({"mode": "best", "k": 2})
  c.selection.min_reward = ml_collections.FieldReference(1.0, field_type=float)
  c.rounds = 2
  c.pool = "all_rounds"
  c.train_after = True
  c.restart_from = ""
  c.reward = ml_collections.ConfigDict({"funcs": "builtin:arithmetic", "model": "",
                                        "model_weight": 1.0})
  c.reward.weights = ml_collections.FieldReference(None, field_type=object)
  c.report = ml_collections.ConfigDict({"task": "auto", "examples": 64, "max_new_tokens": 16})
  c.train = sft.get_config()
  c.train.num_epochs, c.train.max_steps = 2.0, 0
  c.train.checkpoint.every = -1
  c.train.model.remat_policy = "full"  # ~4.6 GB less peak memory, no slower on CPU (README)
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"configs/rejection_sampling.py: unknown variant {variant!r}; choose one "
                     f"of {VARIANTS}")
  if variant == "pairs":
    c.workdir = "runs/rejection_sampling_pairs"
    c.selection.mode = "pairs"
    c.selection.min_reward = None
    c.train = dpo.get_config()
    c.train.num_epochs, c.train.max_steps = 2.0, 0
    c.train.model.remat_policy = "full"
  if variant == "tiny":
    tiny(c)
  return c


def tiny(c):
  """A tiny random Llama with the bundled tokenizer, a few prompts: seconds per round."""
  c.workdir = "runs/rejection_sampling_tiny"
  for key, value in sft.get_config("tiny").model.items():
    c.model[key] = value
  c.prompts_per_round = 8
  c.num_samples = 4
  c.sampling.max_new_tokens = 6
  c.pipeline.batch_size = 4
  c.rounds = 2
  c.selection.min_reward = None
  c.report.examples, c.report.max_new_tokens = 8, 4
  c.train = sft.get_config("tiny")
  c.train.max_steps, c.train.batch_size = 2, 4
  c.train.eval_at_start = False
