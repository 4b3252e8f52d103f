"""An instruction-tuning mixture (FLAN: Wei et al. 2021; Longpre et al. 2023) written as SFT rows.

Each task of `tasks` (any `data.train` source spec, its rows of any columns) is rendered through
its instruction templates (jaxpost/data/templates.py: zero-shot / few-shot per `shots`, answer
options on / off / both, inverted templates) and the tasks are mixed examples-proportionally with
the per-task cap `cap` into `num_rows` prompt/completion rows (r_i = min(n_i, K) / Σ_j
min(n_j, K)). Rows keep `task`, `template`, `shots` and `options` columns; the manifest counts rows
per task. A row that lacks a template field fails naming the task's source, the row and the field.

    python scripts/pipeline.py --config=configs/mixture.py --config.cap=3000
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from jaxpost.data.formats import DataError
from jaxpost.data.templates import Template, mix, mixture_rates, render_task
from jaxpost.pipelines import common

TASK_KEYS = ("source", "templates", "name", "shots", "options", "options_column")


def _task(spec, i: int) -> dict:
  where = f"config.tasks[{i}]"
  if not isinstance(spec, dict) or "source" not in spec or not spec.get("templates"):
    raise common.PipelineError(f"{where} must be a dict with 'source' and 'templates' (keys: "
                               f"{', '.join(TASK_KEYS)})")
  unknown = set(spec) - set(TASK_KEYS)
  if unknown:
    raise common.PipelineError(f"{where} has unknown keys {sorted(unknown)}; allowed: "
                               f"{', '.join(TASK_KEYS)}")
  try:
    templates = [Template(**t) for t in spec["templates"]]
  except TypeError as err:
    raise common.PipelineError(f"{where}.templates: {err} (each is {{prompt, completion, name, "
                               f"inverted}})") from None
  return {"name": spec.get("name") or f"task{i}", "source": spec["source"],
          "templates": templates, "shots": tuple(spec.get("shots", (0,))),
          "options": spec.get("options", "both"),
          "options_column": spec.get("options_column", "options")}


def run(config) -> dict:
  """Renders and mixes `config.tasks` (configs/mixture.py) into workdir/data.jsonl."""
  from jaxpost.configs import mixture as recipe
  common.check_keys(config, recipe.get_config(), recipe.KEYS, "mixture")
  tasks = [_task(common.plain(t), i) for i, t in enumerate(common.plain(config.tasks) or [])]
  if len({t["name"] for t in tasks}) != len(tasks) or not tasks:
    raise common.PipelineError("config.tasks must name at least one task, with distinct names")
  store, start = common.UnitStore(config.workdir, config), time.perf_counter()
  if not store.done("mixture"):
    rendered = {}
    for i, t in enumerate(tasks):
      rows = [r for _, r in common.source_rows(t["source"], f"config.tasks[{i}]")]
      try:
        rendered[t["name"]] = render_task(rows, t["templates"], t["name"], config.seed + i,
                                          t["shots"], t["options"], t["options_column"])
      except DataError as err:
        raise common.PipelineError(f"config.tasks[{i}]: {err}") from None
    mixed = mix(rendered, int(config.num_rows), int(config.cap) or None, config.seed)
    rates = mixture_rates({k: len(v) for k, v in rendered.items()}, int(config.cap) or None)
    counts = Counter(f"rows/{r['task']}" for r in mixed)
    counts.update({f"task_rows/{k}": len(v) for k, v in rendered.items()})
    store.commit("mixture", mixed, counts, {"rates": rates})
  store.export(Path(config.workdir) / common.DATA_FILE, ["mixture"])
  common.write_manifest(config.workdir, config, "", store, True, {"total": time.perf_counter() - start},
                        rates=store.info("mixture")["rates"])
  return {"complete": True, "rows": store.row_count(), "counts": store.stats(),
          "rates": store.info("mixture")["rates"], "data": str(Path(config.workdir) /
                                                                common.DATA_FILE)}
