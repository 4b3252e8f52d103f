"""The keys of a recipe config: their docs, `--help`, and the nearest key to a typo.

Docs are data: `configs/base.py` `KEYS` (shared keys), `jaxpost/data/config.py` `KEYS` (the
`data.*` keys) and each recipe module's `KEYS` (the keys it adds) map a dotted key to one line of
text. The module docstrings append them (`doc_block`), `scripts/train.py --help` prints them next
to the recipe's values (`format_help`), and tests/test_recipe_keys.py checks that every key of
every recipe has a doc. A documented key whose value is a dict (`model.overrides`, `data.columns`,
a `data.train` spec) is one key: its contents are free-form.
"""

from __future__ import annotations

import difflib
import importlib
import textwrap

import ml_collections

from jaxpost.configs import RECIPES


def all_docs() -> dict:
  """{dotted key: doc} of every shared, data and recipe key."""
  from jaxpost.configs import base
  from jaxpost.data import config as data_config
  docs = dict(base.KEYS)
  docs.update({f"data.{k}": v for k, v in data_config.KEYS.items()})
  for recipe in RECIPES:
    docs.update(importlib.import_module(f"jaxpost.configs.{recipe}").KEYS)
  return docs


def flatten(config, docs=None, prefix: str = "") -> dict:
  """{dotted key: value} of a (nested) ConfigDict, stopping at documented dict-valued keys."""
  docs = all_docs() if docs is None else docs
  out = {}
  for name, value in config.items():
    key = prefix + name
    if isinstance(value, ml_collections.ConfigDict) and key not in docs and len(value):
      out.update(flatten(value, docs, key + "."))
    else:
      out[key] = value
  return out


def doc_block(keys: dict, title: str = "Keys") -> str:
  """The docstring section listing `keys` ({dotted key: doc})."""
  width = max(len(k) for k in keys) + 2
  lines = [f"\n{title} (override any with --config.<key>=<value>; unknown keys fail):"]
  for key, doc in keys.items():
    lines.append(_wrapped(f"  {key:<{width}}", doc, width + 2))
  return "\n".join(lines) + "\n"


def format_help(config, name: str, docs=None) -> str:
  """Every key of `config` with its current value and doc (`docs`: {key: doc}, default the
  recipes'): what `train.py --help` prints."""
  docs = all_docs() if docs is None else docs
  flat = flatten(config, docs)
  width = min(max(len(k) for k in flat) + 2, 34)
  lines = [f"Keys of {name} (override with --config.<key>=<value>):"]
  for key, value in flat.items():
    shown = _short(value)
    lines.append(_wrapped(f"  {key:<{width}}", f"= {shown}", width + 2))
    lines.append(textwrap.fill(docs.get(key, "(undocumented)"), 100,
                               initial_indent=" " * 6, subsequent_indent=" " * 6))
  return "\n".join(lines)


# Names a TRL user (or an older config) may type, with the key that does that here.
FAMILIAR_NAMES = {
    "eval_steps": "eval_every (steps between evaluations; eval_batches is the number of eval "
                  "batches, called eval_steps before)",
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "batch_size (GLOBAL: per-device size x devices x grad_accum)",
    "gradient_accumulation_steps": "grad_accum (it splits batch_size; it does not multiply it)",
    "logging_steps": "log_every",
    "save_steps": "checkpoint.every",
    "save_total_limit": "checkpoint.keep",
    "output_dir": "workdir",
    "lr_scheduler_type": "optimizer.schedule",
    "optim": "optimizer.name",
    "gradient_checkpointing": "model.remat_policy",
    "assistant_only_loss": "data.train_on",
    "completion_only_loss": "data.train_on",
    "max_seq_length": "data.max_length",
    "ref_model": "ref.name_or_path",
    "model_name_or_path": "model.name_or_path",
    "adam_beta1": "optimizer.b1",
    "adam_beta2": "optimizer.b2",
    "adam_epsilon": "optimizer.eps",
    "bf16": 'model.dtype="bfloat16" (and model.param_dtype for the master weights)',
    "rpo_alpha": "sft_weight",
    "precompute_ref_log_probs": "precompute_ref",
    "neftune_noise_alpha": "neftune_alpha",
    "report_to": "metrics.tensorboard / metrics.wandb",
    "per_device_eval_batch_size": "batch_size (eval batches have the training batch size)",
    "eval_strategy": "eval_every (0: evaluate only before and after training)",
    "peft_config": "lora.rank, lora.alpha, lora.dropout, lora.targets",
    "target_modules": "lora.targets (a regex over module paths)",
}


def unknown_key_message(key: str, known) -> str:
  """One line for an override of a key the config lacks: the familiar name's key here, or the
  nearest known keys."""
  leaf = key.rsplit(".", 1)[-1]
  if leaf in FAMILIAR_NAMES:
    return f"unknown config key {key!r}; use {FAMILIAR_NAMES[leaf]}"
  near = nearest_keys(key, known)
  hint = f"; did you mean {' or '.join(near)}?" if near else ""
  return f"unknown config key {key!r}{hint}"


def nearest_keys(key: str, known) -> list:
  """Known dotted keys a mistyped `key` probably meant: those with the same last component
  (`learning_rate` -> `optimizer.learning_rate`), else close spellings of the whole key or of
  its last component (`optimizer.learnin_rate`)."""
  known = list(known)
  leaf = key.rsplit(".", 1)[-1]
  leaves = {}
  for k in known:
    leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
  if leaf in leaves:
    return sorted(leaves[leaf], key=lambda k: -difflib.SequenceMatcher(None, key, k).ratio())
  found = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
  for close in difflib.get_close_matches(leaf, list(leaves), n=3, cutoff=0.75):
    found += [k for k in leaves[close] if k not in found]
  return found[:3]


def _short(value) -> str:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _wrapped(head: str, text: str, indent: int) -> str:
  return textwrap.fill(text, 100, initial_indent=head, subsequent_indent=" " * indent)
