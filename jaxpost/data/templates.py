"""Instruction templates and task mixtures (FLAN: Wei et al. 2021; Longpre et al. 2023).

A task's rows (any columns) are rendered through several instruction templates into
prompt/completion rows:

    Template(prompt="Premise: {premise}\\nHypothesis: {hypothesis}\\nDoes the premise entail the "
                    "hypothesis?{options_}", completion="{label}")
    Template(prompt="Write a sentence that the premise {premise!r} entails.",
             completion="{hypothesis}", inverted=True)      # an inverted template (output -> input)

Fields are the row's columns in `str.format` syntax. `{options_}` is the answer-options block
(FLAN's "OPTIONS:\\n- yes\\n- no" from the row's `options` column, or "" when options are off);
few-shot rendering puts k exemplars (other rows of the task through the same template, each
prompt, a newline and its completion) before the prompt, which ends with the same newline.
`render_pairs` draws one template per row (and, with `options="both"` / `shots` lists, one
variant), seeded, so a task yields zero-shot and few-shot rows, with and without options. A row
missing a field fails naming the source, the row and the field. Training reads templated sources
directly (a `data.train` source's `templates`, or `data.templates`: jaxpost/data/sources.py
`templated`); the mixture pipeline (jaxpost/pipelines/mixture.py) writes the same rows to a file.

Mixing (T5 §3.5.2, FLAN): examples-proportional with a cap K, task i gets the share

    r_i = min(n_i, K) / Σ_j min(n_j, K)

of the mixture (`mixture_rates`; a task weight w_i multiplies its min(n_i, K)); `mix` draws
exactly round(r_i · N) rows from task i (largest remainders), cycling through a shuffled order
when a task has fewer rows than its share, and interleaves them in a seeded random order. The
loader's `data.mixture="examples"` uses the same rates for its epochs (jaxpost/data/loader.py).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Collection, Mapping, Optional, Sequence

import numpy as np

from jaxpost.data.formats import DataError

OPTIONS_FIELD = "options_"
SEPARATOR = "\n"  # between a rendered prompt and its completion (exemplars and the row alike)


@dataclasses.dataclass(frozen=True)
class Template:
  prompt: str
  completion: str
  name: str = ""
  inverted: bool = False  # renders the task backwards (e.g. write the input for a given label)

  def fields(self) -> list[str]:
    return [f for text in (self.prompt, self.completion)
            for _, f, _, _ in string.Formatter().parse(text) if f]


def options_block(options: Optional[Sequence[str]]) -> str:
  """FLAN's answer-options suffix ("" for none)."""
  if not options:
    return ""
  return "\n\nOPTIONS:\n" + "\n".join(f"- {o}" for o in options)


def missing_fields(row: Mapping, template: Template) -> list[str]:
  """The row columns `template` names that `row` lacks (or holds as None)."""
  names = sorted({f.split(".")[0].split("[")[0] for f in template.fields()} - {OPTIONS_FIELD})
  return [f for f in names if row.get(f) is None]


def _fill(text: str, row: Mapping, template: Template, where: tuple) -> str:
  missing = missing_fields(row, template)
  if missing:
    raise DataError("missing_field", f"template {template.name or template.prompt[:30]!r} "
                    f"needs field {missing[0]!r}; the row has {sorted(row)}",
                    missing[0]).at(*where)
  return text.format_map(row)


def render(row: Mapping, template: Template, with_options: bool = True,
           exemplars: Sequence[Mapping] = (), options_column: str = "options",
           where: tuple = ("<rows>", 0)) -> dict:
  """{"prompt", "completion"} of one row (module docstring); `where` = (source, row index)."""
  def values(r):
    return {**r, OPTIONS_FIELD: options_block(r.get(options_column)) if with_options else ""}
  shots = [_fill(template.prompt, values(e), template, where) + SEPARATOR
           + _fill(template.completion, values(e), template, where) for e in exemplars]
  prompt = _fill(template.prompt, values(row), template, where)
  return {"prompt": "\n\n".join(shots + [prompt]) + SEPARATOR,
          "completion": _fill(template.completion, values(row), template, where)}


def parse_templates(value, where: str) -> list[Template]:
  """Templates from a list of {prompt, completion, name, inverted} dicts (or Templates); a bad
  entry fails naming `where`."""
  if not value or isinstance(value, (str, Mapping)):
    raise ValueError(f"{where}: expected a non-empty list of templates ({{prompt, completion, "
                     f"name, inverted}} dicts), found {value!r}")
  out = []
  for i, t in enumerate(value):
    try:
      out.append(t if isinstance(t, Template) else Template(**dict(t)))
    except (TypeError, ValueError) as err:
      raise ValueError(f"{where}[{i}]: {err} (each is {{prompt, completion, name, inverted}})"
                       ) from None
  return out


def render_pairs(pairs: Sequence[tuple], templates: Sequence[Template], task: str, seed=0,
                 shots: Sequence[int] = (0,), options="both", options_column: str = "options",
                 chat: bool = False, drop: Collection[str] = ()) -> list[tuple]:
  """[(place, rendered row | DataError)] of [(place, row | DataError)] (`place` = (source, index,
  unit)): every row through one seeded draw of (template, shots in `shots`, options on/off when
  `options="both"`), few-shot exemplars drawn from the other rows that have the template's fields.
  A rendered row is {"prompt", "completion"} (one user and one assistant message when `chat`),
  the row's columns but those in `drop` (e.g. an `answer` a reward function reads), and the
  metadata `task`, `template`, `shots` and `with_options`. A row that misses a field (or is not
  a dict) becomes a DataError at its place; an unreadable row stays one."""
  if not templates:
    raise ValueError("no templates")
  rng = np.random.default_rng(seed)
  pairs = [(place, row if isinstance(row, (Mapping, DataError)) else DataError(
      "bad_row", f"expected a dict-like row, found {type(row).__name__}").at(*place))
           for place, row in pairs]
  fitting = [np.array([j for j, (_, row) in enumerate(pairs) if not isinstance(row, DataError)
                       and not missing_fields(row, t)], np.int64) for t in templates]
  out = []
  for i, (place, row) in enumerate(pairs):
    if isinstance(row, DataError):
      out.append((place, row))
      continue
    n = rng.integers(len(templates))
    t, pool = templates[n], fitting[n]  # exemplars: other rows that have t's fields
    k = int(shots[rng.integers(len(shots))])
    on = bool(rng.integers(2)) if options == "both" else bool(options)
    pos = int(np.searchsorted(pool, i))
    own = int(pos < len(pool) and pool[pos] == i)
    picks = rng.choice(len(pool) - own, size=min(k, len(pool) - own), replace=False) if k else []
    exemplars = [pairs[pool[j + (own and j >= pos)]][1] for j in picks]
    try:
      rendered = render(row, t, on, exemplars, options_column, tuple(place))
    except DataError as err:
      out.append((place, err))
      continue
    if chat:
      rendered = {"prompt": [{"role": "user", "content": rendered["prompt"][:-len(SEPARATOR)]}],
                  "completion": [{"role": "assistant", "content": rendered["completion"]}]}
    carried = {c: v for c, v in row.items() if c not in drop}
    out.append((place, {**carried, **rendered, "task": task, "template": t.name,
                        "shots": k, "with_options": on}))
  return out


def mixture_rates(sizes: Mapping[str, int], cap: Optional[int] = None,
                  weights: Optional[Mapping[str, float]] = None) -> dict:
  """Examples-proportional rates with a per-task cap (module docstring), each task's capped
  size multiplied by its weight (default 1)."""
  capped = {k: (min(n, cap) if cap else n) * (weights or {}).get(k, 1.0)
            for k, n in sizes.items()}
  total = sum(capped.values())
  if total <= 0:
    raise ValueError(f"mixture: no rows in {dict(sizes)}")
  return {k: n / total for k, n in capped.items()}


def mix(tasks: Mapping[str, Sequence[Mapping]], num_rows: int, cap: Optional[int] = None,
        seed: int = 0, weights: Optional[Mapping[str, float]] = None) -> list[dict]:
  """`num_rows` rows drawn from `tasks` ({name: rows}) at `mixture_rates` (module docstring)."""
  rates = mixture_rates({k: len(v) for k, v in tasks.items()}, cap, weights)
  exact = {k: r * num_rows for k, r in rates.items()}
  counts = {k: int(np.floor(v)) for k, v in exact.items()}
  for k in sorted(exact, key=lambda k: counts[k] - exact[k])[:num_rows - sum(counts.values())]:
    counts[k] += 1
  rng = np.random.default_rng(seed)
  out = []
  for name, rows in tasks.items():
    order = rng.permutation(len(rows)) if len(rows) else []
    out += [rows[order[i % len(rows)]] for i in range(counts[name])]
  return [out[i] for i in rng.permutation(len(out))]
