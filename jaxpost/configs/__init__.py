"""The recipes, shipped with the package: `configs/<name>.py` in a checkout is this folder.

    config = jaxpost.configs.get("dpo:lora")     # = configs/dpo.py with variant "lora"
    config.max_steps = 10
    jaxpost.train(config)

Each recipe module defines `get_config(variant=None) -> ml_collections.ConfigDict`; `base.py`
documents the keys every recipe shares.
"""

import importlib

RECIPES = ("sft", "rm", "dpo", "grpo", "rloo", "ppo", "distill")
PIPELINES = ("rejection_sampling", "self_instruct", "teacher_data", "mixture")  # scripts/pipeline.py


def get(name: str):
  """The ConfigDict of recipe or pipeline `name` ("dpo", "dpo:kto", "sft:tiny",
  "rejection_sampling:tiny", ...)."""
  recipe, _, variant = name.partition(":")
  if recipe not in RECIPES + PIPELINES:
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {RECIPES + PIPELINES} (optionally "
                     f"'<recipe>:<variant>')")
  return importlib.import_module(f"jaxpost.configs.{recipe}").get_config(variant or None)
