"""Data-generation pipelines: `jaxpost.pipelines.<name>.run(config)` or
`python scripts/pipeline.py --config=configs/<name>.py`.

    rejection_sampling   best-of-N by a verifier / reward model, then SFT, iterated (Llama 2)
    self_instruct        Self-Instruct (Wang et al. 2022) and Evol-Instruct (Xu et al. 2023)
    teacher_data         sequence-level distillation data: a teacher's completions of prompts
    mixture              instruction templates over tasks, examples-proportional mixing (FLAN)

Shared machinery (resumable row store, manifest, bounds, generation, scoring): common.py.
"""

import importlib

PIPELINES = ("rejection_sampling", "self_instruct", "teacher_data", "mixture")


def run(config) -> dict:
  """Runs the pipeline named by `config.pipeline.name`."""
  name = config.pipeline.name
  if name not in PIPELINES:
    raise ValueError(f"config.pipeline.name={name!r}: choose one of {PIPELINES}")
  return importlib.import_module(f"jaxpost.pipelines.{name}").run(config)


def __getattr__(name):
  if name in PIPELINES:
    return importlib.import_module(f"jaxpost.pipelines.{name}")
  raise AttributeError(name)
