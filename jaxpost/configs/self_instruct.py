"""Self-Instruct and Evol-Instruct (pipeline "self_instruct", jaxpost/pipelines/self_instruct.py).

    python scripts/pipeline.py --config=configs/self_instruct.py        # bundled SmolLM2, the
                                                       # project's own seed tasks (offline)
    python scripts/pipeline.py --config=configs/self_instruct.py \
        --config.seed_tasks=seed_tasks.jsonl --config.num_instructions=1000   # the paper's 175
    python scripts/pipeline.py --config=configs/self_instruct.py:evol   # Evol-Instruct
    python scripts/pipeline.py --config=configs/self_instruct.py:tiny   # tiny random model

Writes Alpaca rows (instruction, input, output) to workdir/data.jsonl: train on them with
`python scripts/train.py --config=configs/sft.py --config.data.train=<workdir>/data.jsonl`.
"""

import ml_collections

from jaxpost.configs import sft
from jaxpost.configs.keys import doc_block
from jaxpost.pipelines import common
from jaxpost.pipelines.self_instruct import BLACKLIST, MODES, OPERATIONS

KEYS = {
    **common.PIPELINE_KEYS, **common.MODEL_KEYS, **common.SAMPLING_KEYS,
    "mode": " | ".join(MODES) + ": Self-Instruct, or Evol-Instruct on the seed instructions",
    "seed_tasks": 'seed tasks in the paper\'s seed_tasks.jsonl format ("": the project\'s own '
                  "small set, jaxpost/data/seed_tasks.jsonl)",
    "chat_template": "wrap prompts as a user turn with the model's chat template (False: plain "
                     "text for the model to continue, as the paper prompts a base LM)",
    "num_instructions": "Self-Instruct: instructions to keep (the run's goal)",
    "num_prompt_instructions": "in-context instructions per generation prompt (paper: 8)",
    "num_prompt_seeds": "of which seed instructions once enough are generated (paper: 6)",
    "drop_truncated": "drop the last instruction of a continuation cut by sampling.max_new_tokens "
                      "(the paper's rule: it may be unfinished)",
    "max_steps": "Self-Instruct: generation steps at most (each pipeline.batch_size prompts)",
    "filters.min_words": "fewest words of a kept instruction",
    "filters.max_words": "most words of a kept instruction",
    "filters.rouge_threshold": "reject an instruction whose ROUGE-L F to any pool instruction "
                               "exceeds this",
    "filters.blacklist": "reject instructions containing one of these words (word boundaries)",
    "instances.shots": "seed tasks of the same type shown in the instance prompt",
    "instances.temperature": "instance generation temperature (the paper: 0)",
    "instances.max_new_tokens": "tokens per generated instance",
    "evol.rounds": "Evol-Instruct: rounds M of evolution",
    "evol.operations": "operations drawn uniformly: " + ", ".join(OPERATIONS),
    "evol.max_instructions": "seed instructions that start evolving (0: all)",
    "evol.response_max_new_tokens": "tokens of each evolved instruction's answer",
}
__doc__ += doc_block(KEYS)

VARIANTS = ("default", "evol", "tiny", "evol_tiny")


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.pipeline = common.pipeline_section("self_instruct", batch_size=8)
  c.workdir = "runs/self_instruct"
  c.seed = 0
  c.model = common.model_section()
  c.sampling = common.sampling_section(max_new_tokens=96, temperature=0.7)
  c.sampling.top_p = 0.5  # the paper's instruction sampling: T = 0.7, top-p 0.5
  c.mode = "self_instruct"
  c.seed_tasks = ""
  c.chat_template = False
  c.num_instructions = 50
  c.num_prompt_instructions = 8
  c.num_prompt_seeds = 6
  c.max_steps = 40
  c.drop_truncated = True
  c.filters = ml_collections.ConfigDict({"min_words": 4, "max_words": 150,
                                         "rouge_threshold": 0.7, "blacklist": list(BLACKLIST)})
  c.instances = ml_collections.ConfigDict({"shots": 3, "temperature": 0.0,
                                           "max_new_tokens": 96})
  c.evol = ml_collections.ConfigDict({"rounds": 4, "operations": list(OPERATIONS),
                                      "max_instructions": 0, "response_max_new_tokens": 128})
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"configs/self_instruct.py: unknown variant {variant!r}; choose one of "
                     f"{VARIANTS}")
  if variant in ("evol", "evol_tiny"):
    c.mode, c.workdir, c.chat_template = "evol", "runs/evol_instruct", True
    c.sampling.top_p = 1.0
  if variant in ("tiny", "evol_tiny"):
    c.workdir += "_tiny"
    for key, value in sft.get_config("tiny").model.items():
      c.model[key] = value
    c.sampling.max_new_tokens = 24
    c.instances.max_new_tokens = c.evol.response_max_new_tokens = 12
    c.num_instructions, c.max_steps, c.pipeline.batch_size = 6, 4, 4
    c.drop_truncated = False  # a random model never ends its list
    c.instances.temperature = 1.0  # its greedy tokens are special tokens (empty text)
    c.evol.rounds, c.evol.max_instructions = 2, 4
  return c
