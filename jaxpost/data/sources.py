"""Data source specs (config.data.train / eval) and the rows each yields, with their places.

A spec is a string (builtin task, local file or folder, hub id), Python rows, a
`datasets.Dataset`, or a dict {"source" | "rows", "weight", "max_rows", "split", "subset",
"columns", "task_kind", "name", "templates", "shots", "options", "options_column", "chat"}; a list
of specs is a weighted mixture (jaxpost/data/config.py). A source with `templates` (or, without
its own, `data.templates`) yields its rows rendered through those instruction templates
(jaxpost/data/templates.py).
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import itertools
import json
import zlib
from typing import Any, Iterator, Mapping, Optional

import ml_collections

from jaxpost.data import readers, templates
from jaxpost.data.formats import FORMATS
from jaxpost.data.readers import Place

CANONICAL_COLUMNS = {c for columns in FORMATS.values() for c in columns} | {"margin"}


@dataclasses.dataclass
class SourceSpec:
  """One source of a mixture; `task_kind` (else data.task_kind, else the loader's kind) is the
  row kind a builtin task generates."""
  source: Any
  weight: float = 1.0
  max_rows: Optional[int] = None
  split: Optional[str] = None
  subset: Optional[str] = None
  columns: Optional[dict] = None
  task_kind: Optional[str] = None
  name: Optional[str] = None
  templates: Optional[list] = None  # instruction templates: {prompt, completion, name, inverted}
  shots: tuple = (0,)  # few-shot exemplar counts drawn per row
  options: Any = "both"  # answer options block: True | False | "both" (drawn per row)
  options_column: str = "options"
  chat: bool = False  # rendered prompt/completion as a user and an assistant message

  def __post_init__(self):
    if self.name is None:
      self.name = self.source if isinstance(self.source, str) else type(self.source).__name__
    if self.weight < 0:
      raise ValueError(f"data source {self.name}: weight {self.weight} < 0")


def plain(value):
  """A ConfigDict as a dict; anything else as is."""
  is_config = isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict))
  return value.to_dict() if is_config else value


def literal(value, key: str):
  """A string that starts with "[" or "{" (a list or dict given on the command line) parsed as
  JSON or a Python literal; anything else as is."""
  if not isinstance(value, str) or value.lstrip()[:1] not in ("[", "{"):
    return value
  try:
    return json.loads(value)
  except ValueError:
    pass
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError) as err:
    raise ValueError(f"{key}: {value[:60]!r}... is neither JSON nor a Python literal ({err})"
                     ) from None


def parse_sources(value, key: str = "data.train") -> list[SourceSpec]:
  """Source specs from config.data.train/eval (see jaxpost/data/config.py)."""
  value = literal(plain(value), key)
  if value is None or value == "":
    raise ValueError("No data source: set config.data.train (or eval), e.g. 'builtin:<task>', a "
                     "file, a hub dataset name or a list of rows")
  is_spec = lambda v: isinstance(v, str) or (isinstance(v, Mapping) and
                                             ("source" in v or "rows" in v))
  if isinstance(value, (list, tuple)) and value and not all(is_spec(plain(v)) for v in value):
    return [SourceSpec(list(value), name="rows")]
  specs = []
  for v in (value if isinstance(value, (list, tuple)) else [value]):
    v = plain(v)
    if isinstance(v, Mapping):
      v = dict(v)
      rows = v.pop("rows", None)
      unknown = set(v) - {f.name for f in dataclasses.fields(SourceSpec)}
      if unknown:
        raise ValueError(f"data source spec has unknown keys {sorted(unknown)}; allowed: source|"
                         f"rows, {', '.join(f.name for f in dataclasses.fields(SourceSpec)[1:])}")
      specs.append(SourceSpec(v.pop("source", rows), **v))
    else:
      specs.append(SourceSpec(v))
  seen = collections.Counter()
  for spec in specs:  # "a", "a" -> "a", "a#2": summaries and template seeds tell them apart
    seen[spec.name] += 1
    spec.name += f"#{seen[spec.name]}" if seen[spec.name] > 1 else ""
  return specs


def read_rows(spec: SourceSpec, split: str, kind: str, cfg: dict) -> Iterator[tuple[Place, Any]]:
  """(place, row or DataError) of one source, at most `max_rows` of them (readers.py)."""
  src = spec.source
  task_kind = spec.task_kind or cfg.get("task_kind") or kind
  if isinstance(src, str) and src.startswith("builtin:"):
    from jaxpost.data.tasks import task_rows  # pylint: disable=import-outside-toplevel
    rows = ((Place(spec.name, i, "row"), r) for i, r in
            enumerate(task_rows(src[len("builtin:"):], split, task_kind)))
  elif isinstance(src, str):
    rows = readers.read_source(src, spec.split or cfg.get(f"{split}_split", split), spec.subset)
  elif hasattr(src, "features") and hasattr(src, "select"):
    rows = readers.dataset_rows(src, spec.name)
  elif isinstance(src, (list, tuple)):
    rows = ((Place(spec.name, i, "row"), r) for i, r in enumerate(src))
  else:
    raise ValueError(f"data source {spec.name}: unsupported type {type(src).__name__}; expected "
                     "a string, a list of rows or a datasets.Dataset")
  return itertools.islice(rows, spec.max_rows)


def templated(spec: SourceSpec, pairs: list, default_templates=None, seed: int = 0) -> list:
  """[(place, row)] of one source through its templates (`spec.templates`, else
  `default_templates` = data.templates; neither: unchanged). Canonical format columns of the
  source rows (chosen, messages, ...) are not carried into the rendered prompt/completion rows;
  the template draws are seeded by (`seed`, the source's name)."""
  value = spec.templates if spec.templates is not None else literal(default_templates,
                                                                     "data.templates")
  if not value:
    return pairs
  where = f"data source {spec.name}: templates"
  return templates.render_pairs(
      pairs, templates.parse_templates(plain(value), where), spec.name,
      [seed, zlib.crc32(spec.name.encode())], tuple(spec.shots), spec.options, spec.options_column,
      spec.chat, CANONICAL_COLUMNS)
