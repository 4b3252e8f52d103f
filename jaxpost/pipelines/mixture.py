"""An instruction-tuning mixture (FLAN: Wei et al. 2021; Longpre et al. 2023) written as SFT rows.

Each task of `tasks` (any `data.train` source spec, its rows of any columns) is rendered through
its instruction templates (jaxpost/data/templates.py: zero-shot / few-shot per `shots`, answer
options on / off / both, inverted templates) and the tasks are mixed examples-proportionally with
the per-task cap `cap` into `num_rows` prompt/completion rows (r_i = min(n_i, K) / Σ_j
min(n_j, K), times the task's `weight`). A task is a data source spec (jaxpost/data/sources.py), so
`data.train = [<the same tasks>]` with `data.mixture="examples"` trains on the same rendering
without this pipeline. Rows keep the source rows' other columns and `task`, `template`, `shots`,
`with_options`; the manifest counts rows per task. A row that lacks a template field fails
naming the task's source, the row and the field.

    python scripts/pipeline.py --config=configs/mixture.py --config.cap=3000
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from jaxpost.data.formats import DataError
from jaxpost.data.sources import SourceSpec, parse_sources, read_rows, templated
from jaxpost.data.templates import mix, mixture_rates, parse_templates
from jaxpost.pipelines import common

def _task(spec, i: int) -> SourceSpec:
  """config.tasks[i] as a data source spec with templates (jaxpost/data/sources.py); its keys are
  a source spec's."""
  where = f"config.tasks[{i}]"
  if not isinstance(spec, dict) or "source" not in spec or not spec.get("templates"):
    raise common.PipelineError(f"{where} must be a data source spec with 'source' and "
                               "'templates' (jaxpost/data/sources.py)")
  try:
    (task,) = parse_sources({"name": f"task{i}", **spec})
    parse_templates(task.templates, f"{where}.templates")
  except ValueError as err:
    raise common.PipelineError(f"{where}: {err}") from None
  return task


def _rendered_rows(task: SourceSpec, where: str, seed: int) -> list[dict]:
  """The task's rows through its templates, as training renders them; a bad row fails."""
  rows = []
  pairs = list(read_rows(task, "train", "sft", {"train_split": "train"}))
  for _, row in templated(task, pairs, seed=seed):
    if isinstance(row, DataError):
      raise common.PipelineError(f"{where}: {row}")
    rows.append(row)
  return rows


def run(config) -> dict:
  """Renders and mixes `config.tasks` (configs/mixture.py) into workdir/data.jsonl."""
  from jaxpost.configs import mixture as recipe
  common.check_keys(config, recipe.get_config(), recipe.KEYS, "mixture")
  tasks = [_task(common.plain(t), i) for i, t in enumerate(common.plain(config.tasks) or [])]
  if len({t.name for t in tasks}) != len(tasks) or not tasks:
    raise common.PipelineError("config.tasks must name at least one task, with distinct names")
  store, start = common.UnitStore(config.workdir, config), time.perf_counter()
  if not store.done("mixture"):
    rendered = {t.name: _rendered_rows(t, f"config.tasks[{i}]", config.seed)
                for i, t in enumerate(tasks)}
    weights = {t.name: t.weight for t in tasks}
    mixed = mix(rendered, int(config.num_rows), int(config.cap) or None, config.seed, weights)
    rates = mixture_rates({k: len(v) for k, v in rendered.items()}, int(config.cap) or None,
                          weights)
    counts = Counter(f"rows/{r['task']}" for r in mixed)
    counts.update({f"task_rows/{k}": len(v) for k, v in rendered.items()})
    store.commit("mixture", mixed, counts, {"rates": rates})
  store.export(Path(config.workdir) / common.DATA_FILE, ["mixture"])
  common.write_manifest(config.workdir, config, "", store, True, {"total": time.perf_counter() - start},
                        rates=store.info("mixture")["rates"])
  return {"complete": True, "rows": store.row_count(), "counts": store.stats(),
          "rates": store.info("mixture")["rates"], "data": str(Path(config.workdir) /
                                                                common.DATA_FILE)}
