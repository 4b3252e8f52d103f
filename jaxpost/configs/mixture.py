"""An instruction-tuning mixture (pipeline "mixture", jaxpost/pipelines/mixture.py).

    python scripts/pipeline.py --config=configs/mixture.py               # seed tasks + arithmetic
    python scripts/pipeline.py --config=configs/mixture.py --config.cap=500 --config.num_rows=5000

`tasks` is a list of data source specs with templates (jaxpost/data/sources.py): {"source": <any
data.train spec>, "templates": [{"prompt", "completion", "name", "inverted"}], "name", "shots":
[0, 2], "options": "both" | True | False, "options_column", "chat", "weight", "max_rows",
"columns", "split", "subset"}; template fields are the rows' columns in str.format syntax
(`{prompt[0][content]}` indexes a message list), `{options_}` the answer-options block. Set it
from Python (`config.tasks = [...]`) or as a Python literal on the command line. Then train:
`python scripts/train.py --config=configs/sft.py --config.data.train=<workdir>/data.jsonl`, or
skip the file: `--config.data.train=<the same tasks> --config.data.mixture=examples
--config.data.mixture_cap=<cap>` renders them through the same templates and mixes them at the
same rates while loading.
"""

import ml_collections

from jaxpost.configs.keys import doc_block
from jaxpost.pipelines import common

KEYS = {
    **{k: common.PIPELINE_KEYS[k] for k in ("pipeline.name", "workdir")},
    "seed": "seed of the template draws, the few-shot exemplars and the mixing order",
    "tasks": "the tasks: source, templates, name, shots, options (module docstring)",
    "cap": "per-task cap K of examples-proportional mixing (0: none)",
    "num_rows": "rows in the mixture",
}
__doc__ += doc_block(KEYS)

VARIANTS = ("default",)
SEED_TEMPLATES = [
    {"name": "instruction", "prompt": "{instruction}\n\n{instances[0][input]}",
     "completion": "{instances[0][output]}"},
    {"name": "inverted", "prompt": "Here is a response: {instances[0][output]}\n"
                                   "Write an instruction it could answer.",
     "completion": "{instruction}", "inverted": True}]
ARITHMETIC_TEMPLATES = [
    {"name": "question", "prompt": "{prompt[0][content]}", "completion": "{completion[0][content]}"},
    {"name": "solve", "prompt": "Solve: {prompt[0][content]}\nAnswer:",
     "completion": "{completion[0][content]}"}]


def get_config(arg=None):
  if (arg or "default") not in VARIANTS:
    raise ValueError(f"configs/mixture.py: unknown variant {arg!r}; choose one of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.pipeline = ml_collections.ConfigDict({"name": "mixture"})
  c.workdir = "runs/mixture"
  c.seed = 0
  c.tasks = ml_collections.FieldReference([
      {"name": "seed_tasks", "source": str(common.seed_tasks_path()),
       "templates": SEED_TEMPLATES, "shots": [0, 2]},
      {"name": "arithmetic", "source": "builtin:arithmetic", "templates": ARITHMETIC_TEMPLATES,
       "shots": [0, 3]}], field_type=object)
  c.cap = 1000
  c.num_rows = 2000
  return c
