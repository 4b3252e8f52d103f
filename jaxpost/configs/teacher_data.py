"""Sequence-level distillation data (pipeline "teacher_data", jaxpost/pipelines/teacher_data.py).

    python scripts/pipeline.py --config=configs/teacher_data.py \
        --config.model.name_or_path=/path/to/teacher --config.data.train=prompts.jsonl
    python scripts/pipeline.py --config=configs/teacher_data.py:tiny    # tiny random model

The teacher's greedy completions of every prompt become prompt/completion rows in
workdir/data.jsonl, for `configs/sft.py --config.data.train=<workdir>/data.jsonl`.
"""

import ml_collections

from jaxpost.configs import sft
from jaxpost.configs.keys import doc_block
from jaxpost.pipelines import common

KEYS = {
    **common.PIPELINE_KEYS, **common.MODEL_KEYS, **common.SAMPLING_KEYS,
    "data.train": "prompt source spec(s): any data.train source with a prompt column",
    "data.task_kind": 'built-in tasks: the kind of rows generated ("prompt")',
    "data.columns": "canonical column name -> the dataset's column name",
    "num_samples": "completions per prompt (1 with temperature 0: the teacher's greedy output)",
    "drop_truncated": "drop completions that hit sampling.max_new_tokens",
}
__doc__ += doc_block(KEYS)

VARIANTS = ("default", "tiny")


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.pipeline = common.pipeline_section("teacher_data", batch_size=32)
  c.workdir = "runs/teacher_data"
  c.seed = 0
  c.model = common.model_section()
  c.data = common.data_section()
  c.sampling = common.sampling_section(max_new_tokens=64, temperature=0.0)
  c.num_samples = 1
  c.drop_truncated = True
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"configs/teacher_data.py: unknown variant {variant!r}; choose one of "
                     f"{VARIANTS}")
  if variant == "tiny":
    c.workdir = "runs/teacher_data_tiny"
    for key, value in sft.get_config("tiny").model.items():
      c.model[key] = value
    c.sampling.max_new_tokens, c.sampling.temperature = 6, 1.0
    c.drop_truncated = False
    c.pipeline.batch_size = 4
  return c
