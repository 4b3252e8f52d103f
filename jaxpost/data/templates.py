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
prompt followed by its completion) before the prompt. `render_task` draws one template per row
(and, with `options="both"` / `shots` lists, one variant), seeded, so a task yields zero-shot and
few-shot rows, with and without options. A row missing a field fails naming the source, the row
and the field.

Mixing (T5 §3.5.2, FLAN): examples-proportional with a cap K, task i gets the share

    r_i = min(n_i, K) / Σ_j min(n_j, K)

of the mixture (`mixture_rates`); `mix` draws exactly round(r_i · N) rows from task i (largest
remainders), cycling through a shuffled order when a task has fewer rows than its share, and
interleaves them in a seeded random order.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Mapping, Optional, Sequence

import numpy as np

from jaxpost.data.formats import DataError

OPTIONS_FIELD = "options_"


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


def _fill(text: str, row: Mapping, template: Template, where: tuple) -> str:
  for field in {f.split(".")[0].split("[")[0] for f in template.fields()}:
    if field not in row or row[field] is None:
      raise DataError("missing_field", f"template {template.name or template.prompt[:30]!r} "
                      f"needs field {field!r}; the row has {sorted(row)}", field).at(*where)
  return text.format_map(row)


def render(row: Mapping, template: Template, with_options: bool = True,
           exemplars: Sequence[Mapping] = (), options_column: str = "options",
           where: tuple = ("<rows>", 0)) -> dict:
  """{"prompt", "completion"} of one row (module docstring); `where` = (source, row index)."""
  def values(r):
    return {**r, OPTIONS_FIELD: options_block(r.get(options_column)) if with_options else ""}
  shots = [_fill(template.prompt, values(e), template, where) + "\n"
           + _fill(template.completion, values(e), template, where) for e in exemplars]
  prompt = _fill(template.prompt, values(row), template, where)
  return {"prompt": "\n\n".join(shots + [prompt]),
          "completion": _fill(template.completion, values(row), template, where)}


def render_task(rows: Sequence[Mapping], templates: Sequence[Template], source: str = "<rows>",
                seed: int = 0, shots: Sequence[int] = (0,), options="both",
                options_column: str = "options") -> list[dict]:
  """Every row through one seeded draw of (template, shots in `shots`, options on/off when
  `options="both"`); rows carry `task`, `template`, `shots` and `options` metadata columns."""
  if not templates:
    raise ValueError(f"{source}: no templates")
  rng = np.random.default_rng(seed)
  out = []
  for i, row in enumerate(rows):
    t = templates[rng.integers(len(templates))]
    k = int(shots[rng.integers(len(shots))])
    on = bool(rng.integers(2)) if options == "both" else bool(options)
    picks = rng.choice(len(rows) - 1, size=min(k, len(rows) - 1), replace=False) if k else []
    exemplars = [rows[j + (j >= i)] for j in picks]  # any row but this one
    rendered = render(row, t, on, exemplars, options_column, (source, i))
    out.append({**rendered, "task": source, "template": t.name, "shots": k, "options": on})
  return out


def mixture_rates(sizes: Mapping[str, int], cap: Optional[int] = None) -> dict:
  """Examples-proportional rates with a per-task cap (module docstring)."""
  capped = {k: min(n, cap) if cap else n for k, n in sizes.items()}
  total = sum(capped.values())
  if total <= 0:
    raise ValueError(f"mixture: no rows in {dict(sizes)}")
  return {k: n / total for k, n in capped.items()}


def mix(tasks: Mapping[str, Sequence[Mapping]], num_rows: int, cap: Optional[int] = None,
        seed: int = 0) -> list[dict]:
  """`num_rows` rows drawn from `tasks` ({name: rows}) at `mixture_rates` (module docstring)."""
  rates = mixture_rates({k: len(v) for k, v in tasks.items()}, cap)
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
