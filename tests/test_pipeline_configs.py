"""Every key of every pipeline config is documented, and every doc names a key."""

import importlib

import pytest

from jaxpost import configs
from jaxpost.configs import keys

VARIANTS = {"rejection_sampling": ("default", "pairs", "tiny"),
            "self_instruct": ("default", "evol", "tiny", "evol_tiny"),
            "teacher_data": ("default", "tiny"), "mixture": ("default",)}


@pytest.mark.parametrize("name", configs.PIPELINES)
def test_every_key_documented(name):
  recipe = importlib.import_module(f"jaxpost.configs.{name}")
  assert recipe.VARIANTS == VARIANTS[name]
  docs = {**recipe.KEYS, **{f"train.{k}": v for k, v in keys.all_docs().items()}}
  seen = set()
  for variant in recipe.VARIANTS:
    config = configs.get(f"{name}:{variant}")
    assert config.pipeline.name == name
    flat = keys.flatten(config, docs)
    undocumented = sorted(k for k in flat if k not in docs)
    assert not undocumented, f"{name}:{variant} keys without a doc: {undocumented}"
    seen |= set(flat)
  unused = sorted(k for k in recipe.KEYS if k not in seen)
  assert not unused, f"{name}: docs of keys no variant has: {unused}"
