"""What a run evaluates on when the config says "auto": eval data and the task report follow the
training data, so custom data is never evaluated on (or reported as) the built-in task.

`data.eval = "auto"` (the default) resolves to, in order:

  1. a held-out slice of data.train when `data.eval_fraction` f > 0: in each training source
     (read at its training split), the rows whose position in a fixed permutation of its n rows
     is below ceil(f n) are eval rows and are never trained on;
  2. the eval split of data.train when every training source is a built-in task (their train
     and eval questions are disjoint);
  3. no eval data (the run says so).

An explicit `data.eval` (a source spec) is used as is; "" or None is no eval data.
`report.task = "auto"` is the built-in task data.train is drawn from (one task name), else none.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from jaxpost.data.sources import parse_sources

AUTO = "auto"
BUILTIN = "builtin:"
PERMUTATION_SEED = 20240917  # fixed: the held-out rows do not move with config.seed


def _get(cfg, key, default=None):
  return cfg.get(key, default) if hasattr(cfg, "get") else default


def builtin_tasks(train) -> Optional[set]:
  """The task names when every source of `data.train` is `builtin:<task>`, else None."""
  if train is None or train == "":
    return None
  if isinstance(train, str) and train.startswith("synthetic"):
    return None
  sources = [s.source for s in parse_sources(train)]
  if not all(isinstance(s, str) and s.startswith(BUILTIN) for s in sources):
    return None
  return {s[len(BUILTIN):] for s in sources}


def holdout_fraction(data_cfg) -> float:
  """f of rule 1 when data.eval is "auto" (0.0 otherwise: nothing is held out)."""
  if _get(data_cfg, "eval") != AUTO:
    return 0.0
  return float(_get(data_cfg, "eval_fraction", 0.0) or 0.0)


def eval_plan(data_cfg) -> tuple:
  """(eval sources or None, read split, held-out fraction, a plain description) of config.data.

  The read split is "eval" except for a held-out slice, which reads the training split."""
  source, fraction = _get(data_cfg, "eval"), holdout_fraction(data_cfg)
  train = _get(data_cfg, "train")
  if source != AUTO:
    if source is None or source == "":
      return None, "eval", 0.0, "no eval data (data.eval is empty)"
    return source, "eval", 0.0, f"data.eval = {_name(source, 'data.eval')}"
  if fraction > 0:
    return train, "train", fraction, f"held-out {fraction:g} of data.train (not trained on)"
  if builtin_tasks(train):
    return train, "eval", 0.0, f"the held-out eval split of {_name(train, 'data.train')}"
  return None, "eval", 0.0, ("no eval data: data.train is not a built-in task; set data.eval "
                             "to a source or data.eval_fraction > 0 for a held-out slice")


def report_task(config) -> str:
  """The built-in task to report on ("" for none); see the module docstring."""
  report = _get(config, "report")
  task = _get(report, "task", "") if report is not None else ""
  return resolve_task(task, _get(_get(config, "data"), "train"))


def resolve_task(task, train) -> str:
  """`task` as named ("" / None: none), or for "auto" the one built-in task of `train`."""
  if task != AUTO:
    return task or ""
  tasks = builtin_tasks(train)
  return next(iter(tasks)) if tasks and len(tasks) == 1 else ""


def held_out_positions(n: int, fraction: float) -> np.ndarray:
  """Sorted row positions (of n) held out for eval: ceil(f n) of a fixed permutation."""
  count = min(n, math.ceil(fraction * n))
  return np.sort(np.random.default_rng(PERMUTATION_SEED).permutation(n)[:count])


def loader_plan(data_cfg, split: str) -> tuple:
  """(sources, read split, part, fraction) a loader of `split` ("train" | "eval") reads:
  `part` is "train" / "eval" for the two sides of a held-out slice, None for all rows."""
  fraction = holdout_fraction(data_cfg)
  if split == "train":
    return _get(data_cfg, "train"), "train", "train" if fraction > 0 else None, fraction
  sources, read_split, fraction, description = eval_plan(data_cfg)
  if sources is None:
    raise ValueError(f"config.data: {description}")
  return sources, read_split, "eval" if fraction > 0 else None, fraction


def select_part(rows: list, part: Optional[str], fraction: float) -> list:
  """The training part ("train") or held-out part ("eval") of one source's rows (as read, in
  order), or all of them when `part` is None."""
  if part is None or fraction <= 0:
    return rows
  held = held_out_positions(len(rows), fraction)
  keep = held if part == "eval" else np.setdiff1d(np.arange(len(rows)), held)
  return [rows[int(i)] for i in keep]


def part_label(split: str, part: Optional[str], fraction: float) -> str:
  """The split name of a loader summary: "eval (held-out 0.1 of train)", ..."""
  if part is None:
    return split
  side = "held-out" if part == "eval" else "without the held-out"
  return f"{split} ({side} {fraction:g} of the train split)"


def _name(source, key: str) -> str:
  inner = _get(source, "source") if not isinstance(source, str) else source
  return inner if isinstance(inner, str) else f"the {key} sources"
