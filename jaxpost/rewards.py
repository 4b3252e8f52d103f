"""Python reward functions for rollout algorithms (GRPO, RLOO, PPO) and data-generation pipelines.

A reward function has TRL's signature (TRL 1.16 `GRPOTrainer`, "Using a custom reward function"):

    fn(prompts, completions, **columns) -> list[float | None]

called with keywords (`prompts=..., completions=...`, as TRL does, so `def fn(completions,
**kwargs)` works). `prompts` and `completions` are N strings or N chat message lists (a
conversational completion is `[{"role": "assistant", "content": ...}]`); every other column of
the prompt rows (e.g. `answer`) arrives as a keyword list of the same length N. It returns one
reward per completion: a real number, or None when it cannot score that completion (e.g. a
math verifier shown a coding prompt).

Specs (config key `reward.funcs`: a comma-separated string or a list; callables may be given
directly), each loaded and checked by `load` at setup, before any model work:

    builtin:<task>           the verifier of built-in task <task> (jaxpost/data/tasks), named <task>;
                             arithmetic scores 1 when the final number equals the `answer`
                             column (recomputed from the prompt when there is no such column)
    path/to/file.py:fn       `fn` from a Python file (relative paths from the working directory;
                             the file runs once per version, shared by its functions)
    package.module:fn        `fn` from an importable module (`fn` may be dotted: `Class.method`)

A function's metric name is its spec's name for builtins, else its `__name__`; a repeated name
gets a suffix `_2`, `_3`, ... `reward.weights` gives one weight per function (default 1.0 each).

Combination (as TRL 1.16 `GRPOTrainer._calculate_rewards`): with r_fi the raw reward of function
f for completion i (None -> NaN) and w_f its weight,

    total_i = Σ_f w_f r_fi, a None counting 0 (TRL's nansum)

except that a completion for which EVERY function returns None is unscorable: total_i = NaN
(TRL sums it to 0 and warns; here it stays NaN so the advantage code excludes it from the group
statistics and gives it advantage 0, see jaxpost/losses/grpo.py). Metrics, TRL's names:
`rewards/<name>/mean|std` over the function's non-None rewards, `reward` and `reward_std` over
the scorable totals of the batch (standard deviations unbiased, as TRL's `nanstd`; a mean of no
value is NaN, a std of one value 0). TRL's `reward_std` is the mean per-group std; grouping
belongs to the advantage code, which may overwrite it.

A function that raises, returns a non-sequence or a wrong number of values, a non-number, NaN or
±Inf stops scoring with a `RewardError` naming its spec and the row (with the start of the prompt);
when a call on the whole batch raises, the rows are retried one by one to find the failing one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
import zlib
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from jaxpost.data import tasks

FUNCS_KEY = "reward.funcs"
WEIGHTS_KEY = "reward.weights"
_PREVIEW_CHARS = 60


class RewardError(ValueError):
  """A reward function or spec failed; the message names the spec, the key or the row."""


@dataclasses.dataclass(frozen=True)
class RewardFunction:
  name: str    # unique metric name: rewards/<name>/mean
  spec: str    # as written in reward.funcs (or module.qualname for a callable given directly)
  fn: Callable[..., Sequence[Any]]


class Scores(NamedTuple):
  total: np.ndarray         # float32 [N]: weighted sum, NaN = unscorable (every function None)
  per_function: np.ndarray  # float32 [F, N]: raw (unweighted) rewards, NaN = None
  metrics: dict[str, float]


# ----------------------------------------------------------------------------- loading


def parse_specs(funcs) -> list:
  """`reward.funcs` as a list of specs: a comma-separated string is split (blank entries
  dropped), a list/tuple taken item by item, a single callable wrapped."""
  if isinstance(funcs, str):
    specs = [s.strip() for s in funcs.split(",") if s.strip()]
  elif callable(funcs):
    specs = [funcs]
  elif isinstance(funcs, (list, tuple)):
    specs = [s.strip() if isinstance(s, str) else s for s in funcs]
  else:
    raise RewardError(f"{FUNCS_KEY} must be a comma-separated string, a list of specs or a "
                      f"callable, got {type(funcs).__name__}: {funcs!r}")
  if not specs:
    raise RewardError(f"{FUNCS_KEY} is empty: name at least one reward function, e.g. "
                      f"'builtin:arithmetic' or 'path/to/file.py:fn'")
  return specs


def _builtin(task: str) -> Callable[..., list]:
  """A built-in task verifier adapted to TRL's signature (row columns -> the verifier's rows)."""
  verify = tasks.reward_fn(task)

  def reward(prompts, completions, **columns):
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())] if columns else None
    return verify(prompts, completions, rows).tolist()

  reward.__name__ = reward.__qualname__ = task
  return reward


def _load_error(spec: str, why: str) -> RewardError:
  return RewardError(f"{FUNCS_KEY}: cannot load reward function {spec!r}: {why}")


_FILE_MODULES: dict[tuple[str, int], Any] = {}  # (absolute path, mtime_ns) -> module


def _import_file(spec: str, path: str):
  """Executes a Python file as a module, once per version of the file (several functions of one
  file share it); registered in sys.modules under a unique name so dataclasses and pickling in it
  work."""
  full = os.path.abspath(path)
  if not os.path.isfile(full):
    raise _load_error(spec, f"no file {full}")
  key = (full, os.stat(full).st_mtime_ns)
  if key in _FILE_MODULES:
    return _FILE_MODULES[key]
  name = f"_jaxpost_reward_{os.path.splitext(os.path.basename(full))[0]}_{zlib.crc32(full.encode())}"
  module_spec = importlib.util.spec_from_file_location(name, full)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module
  try:
    module_spec.loader.exec_module(module)
  except Exception as err:  # SyntaxError, ImportError, anything its top level raises
    del sys.modules[name]
    raise _load_error(spec, f"{full} failed to import: {type(err).__name__}: {err}") from err
  _FILE_MODULES[key] = module
  return module


def _import_module(spec: str, name: str):
  try:
    return importlib.import_module(name)
  except Exception as err:
    raise _load_error(spec, f"module {name!r} failed to import: {type(err).__name__}: {err}") from err


def _check_signature(spec: str, fn: Callable):
  """TRL calls `fn(prompts=..., completions=..., **columns)`: both keywords must be accepted."""
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    return  # some C callables have no signature; the first call will tell
  try:
    signature.bind_partial(prompts=None, completions=None)
  except TypeError as err:
    raise _load_error(spec, f"it must accept the keywords prompts= and completions= "
                            f"(TRL's signature fn(prompts, completions, **columns)): {err}") from err


def load_function(spec) -> tuple[str, str, Callable]:
  """One spec (see the module docstring) -> (name, spec string, callable)."""
  if callable(spec):
    label = f"{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', repr(spec))}"
    _check_signature(label, spec)
    return getattr(spec, "__name__", type(spec).__name__), label, spec
  if not isinstance(spec, str):
    raise RewardError(f"{FUNCS_KEY}: a spec must be a string or a callable, got "
                      f"{type(spec).__name__}: {spec!r}")
  source, sep, attr = spec.rpartition(":")
  if not sep or not source or not attr:
    raise _load_error(spec, "expected builtin:<task>, path/to/file.py:fn or module:fn")
  if source == "builtin":
    if attr not in tasks.TASKS:
      raise _load_error(spec, f"unknown built-in task {attr!r} (known: {', '.join(tasks.TASKS)})")
    return attr, spec, _builtin(attr)
  module = _import_file(spec, source) if source.endswith(".py") else _import_module(spec, source)
  try:
    fn = functools.reduce(getattr, attr.split("."), module)
  except AttributeError as err:
    raise _load_error(spec, f"{source} has no attribute {attr!r}") from err
  if not callable(fn):
    raise _load_error(spec, f"{attr} is a {type(fn).__name__}, not a function")
  _check_signature(spec, fn)
  return getattr(fn, "__name__", attr.rsplit(".", 1)[-1]), spec, fn


def _unique(names: list[str]) -> list[str]:
  """Repeated names get _2, _3, ... in order of appearance (a suffix never clashes)."""
  out: list[str] = []
  for name in names:
    candidate, k = name, 1
    while candidate in out or (candidate != name and candidate in names):
      k += 1
      candidate = f"{name}_{k}"
    out.append(candidate)
  return out


def parse_weights(weights, count: int) -> np.ndarray:
  """`reward.weights` (None, a comma-separated string or a list of numbers) -> float32 [count]."""
  if weights is None:
    return np.ones(count, np.float32)
  items = [w for w in weights.split(",") if w.strip()] if isinstance(weights, str) else weights
  try:
    values = [float(w) for w in items]
  except (TypeError, ValueError) as err:
    raise RewardError(f"{WEIGHTS_KEY} must be numbers (one per function of {FUNCS_KEY}), "
                      f"got {weights!r}") from err
  if len(values) != count:
    raise RewardError(f"{WEIGHTS_KEY} has {len(values)} weight(s) but {FUNCS_KEY} names "
                      f"{count} function(s): give one weight per function")
  if not all(math.isfinite(v) for v in values):
    raise RewardError(f"{WEIGHTS_KEY} must be finite numbers, got {weights!r}")
  return np.asarray(values, np.float32)


def load(funcs, weights=None) -> RewardFunctions:
  """Loads and checks `reward.funcs` / `reward.weights` at setup (a RewardError names the key
  and the spec); the result scores a batch: `load(...)(prompts, completions, columns) -> Scores`."""
  loaded = [load_function(spec) for spec in parse_specs(funcs)]
  names = _unique([name for name, _, _ in loaded])
  functions = tuple(RewardFunction(name, spec, fn)
                    for name, (_, spec, fn) in zip(names, loaded))
  return RewardFunctions(functions, parse_weights(weights, len(functions)))


# ----------------------------------------------------------------------------- scoring


def _preview(prompt) -> str:
  """The prompt's first characters (the last message's content for a conversational prompt)."""
  if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[-1], Mapping):
    prompt = prompt[-1].get("content", prompt[-1])
  text = str(prompt)
  return repr(text[:_PREVIEW_CHARS] + ("..." if len(text) > _PREVIEW_CHARS else ""))


def _as_reward(value) -> float | None:
  """None, or a real number (Python, numpy, or a 0-d array) as float; TypeError otherwise."""
  if value is None:
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  if getattr(value, "shape", None) == () and np.asarray(value).dtype.kind in "biuf":
    return float(value)
  raise TypeError(f"{type(value).__name__} {value!r}")


def _row(sequence, i: int):
  """Row i of a batch argument, still as a batch of one."""
  return sequence[i:i + 1]


class RewardFunctions:
  """Loaded reward functions and their weights; call it to score a batch (see module docstring)."""

  def __init__(self, functions: Sequence[RewardFunction], weights: np.ndarray):
    self.functions = tuple(functions)
    self.weights = np.asarray(weights, np.float32)

  @property
  def names(self) -> list[str]:
    return [f.name for f in self.functions]

  def _error(self, func: RewardFunction, prompts, i: int | None, why: str) -> RewardError:
    where = "" if i is None else f" at row {i} (prompt {_preview(prompts[i])})"
    return RewardError(f"reward function {func.spec!r} ({func.name}){where}: {why}")

  def _failing_row(self, func: RewardFunction, prompts, completions, columns) -> int | None:
    """The first row on which `func` raises when called on that row alone, or None."""
    for i in range(len(completions)):
      try:
        func.fn(prompts=_row(prompts, i), completions=_row(completions, i),
                **{k: _row(v, i) for k, v in columns.items()})
      except Exception:
        return i
    return None

  def _call(self, func: RewardFunction, prompts, completions, columns) -> np.ndarray:
    """One function on the batch -> float64 [N] with NaN for None (checked; see module doc)."""
    try:
      out = func.fn(prompts=prompts, completions=completions, **columns)
    except Exception as err:
      i = self._failing_row(func, prompts, completions, columns)
      why = "" if i is not None else " (on the whole batch; no single row fails alone)"
      raise self._error(func, prompts, i, f"raised {type(err).__name__}: {err}{why}") from err
    try:
      count = None if isinstance(out, (str, bytes, Mapping)) else len(out)
    except TypeError:
      count = None
    if count is None:
      raise self._error(func, prompts, None, f"must return a list of float | None, got "
                                             f"{type(out).__name__}")
    if count != len(completions):
      raise self._error(func, prompts, None, f"returned {count} rewards for "
                                             f"{len(completions)} completions")
    values = np.full(len(completions), np.nan)
    for i, value in enumerate(out):
      try:
        reward = _as_reward(value)
      except TypeError as err:
        raise self._error(func, prompts, i, f"returned {err}, not a number or None") from None
      if reward is not None and not math.isfinite(reward):
        raise self._error(func, prompts, i, f"returned {reward} (use None for unscorable)")
      values[i] = np.nan if reward is None else reward
    return values

  def __call__(self, prompts: Sequence, completions: Sequence,
               columns: Mapping[str, Sequence] | None = None) -> Scores:
    """Scores N completions of N prompts; `columns` are the prompt rows' other columns."""
    columns = dict(columns or {})
    n = len(completions)
    if len(prompts) != n:
      raise RewardError(f"reward: {len(prompts)} prompts but {n} completions")
    for key, values in columns.items():
      if key in ("prompts", "completions"):
        raise RewardError(f"reward: a row column may not be named {key!r} (TRL passes it as the "
                          f"argument of that name)")
      if len(values) != n:
        raise RewardError(f"reward: column {key!r} has {len(values)} values for {n} completions")
    raw = np.stack([self._call(f, prompts, completions, columns) for f in self.functions])
    scorable = ~np.isnan(raw).all(axis=0)
    total = np.where(scorable, np.nansum(raw * self.weights[:, None], axis=0), np.nan)
    metrics = {}
    for func, row in zip(self.functions, raw):
      metrics[f"rewards/{func.name}/mean"], metrics[f"rewards/{func.name}/std"] = _mean_std(row)
    metrics["reward"], metrics["reward_std"] = _mean_std(total)
    return Scores(total.astype(np.float32), raw.astype(np.float32), metrics)


def _mean_std(values: np.ndarray) -> tuple[float, float]:
  """Mean and unbiased std of the non-NaN values (NaN, NaN for none; std 0 for one)."""
  kept = values[~np.isnan(values)]
  if kept.size == 0:
    return math.nan, math.nan
  return float(kept.mean()), (float(kept.std(ddof=1)) if kept.size > 1 else 0.0)


__all__ = ["RewardError", "RewardFunction", "RewardFunctions", "Scores", "load", "load_function",
           "parse_specs", "parse_weights", "FUNCS_KEY", "WEIGHTS_KEY"]
