"""What every data-generation pipeline shares: a resumable row store, the manifest, bounds,
progress bars, the config check, and generation / scoring of rows.

A pipeline cuts its work into *units* (a batch of prompts of one round, one step of a growing
pool) identified by a string id. A finished unit is committed to `workdir/` in two atomic steps:

    parts/<unit>.jsonl     its rows (written to a temporary file, then renamed)
    state.json             the list of committed units with their counts (then renamed)

`state.json` is the commit point: a unit is done when it is listed there, so a run killed at any
instant leaves every file whole (a reader sees the old or the new file, never half of one), and a
rerun redoes exactly the units not listed (a part file without its state entry is overwritten).
Units derive their random seeds from (seed, unit), so redone work gives the same rows as an
uninterrupted run: no duplicates, no losses. `export` writes the final `data.jsonl` (or a round's
pool) the same way. `state.json` also holds the config fingerprint: resuming a workdir with a
different config fails naming the keys that differ (the bounds `pipeline.max_rows`,
`pipeline.max_seconds` and the progress bar may change between runs).

`manifest.json` (rewritten at the end of every run, complete or not) records the config, the
model, the counts per filter (summed over units), timings, the package versions and whether the
run is complete (`pipeline.max_rows` / `pipeline.max_seconds` stop a run early; rerun the same
command to go on).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import ml_collections
import numpy as np

from jaxpost.configs import keys as config_keys

log = logging.getLogger("jaxpost.pipelines")

STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
DATA_FILE = "data.jsonl"
# Keys that may change between a run and its continuation.
RESUMABLE_KEYS = ("pipeline.max_rows", "pipeline.max_seconds", "pipeline.progress_bar")

PIPELINE_KEYS = {
    "pipeline.name": "which pipeline runs (jaxpost/pipelines/<name>.py)",
    "pipeline.max_rows": "stop once this many rows are kept, checked between units (0: no "
                         "bound); rerun without it to go on",
    "pipeline.max_seconds": "stop starting new units after this many seconds (0: no bound); "
                            "rerun the same command to continue",
    "pipeline.batch_size": "prompts per unit of work (one generate call, one commit)",
    "pipeline.generate_batch_size": "rows per compiled generation batch (jaxpost.generate)",
    "pipeline.progress_bar": "tqdm bars over the units",
    "workdir": "output directory: data.jsonl, manifest.json, state.json, parts/",
    "seed": "seed of sampling (each unit folds in its id, so reruns repeat it)",
}
MODEL_KEYS = {
    "model.name_or_path": 'HF directory, hub id or "bundled:<name>" (with random_init: the '
                          "architecture and tokenizer)",
    "model.dtype": "compute dtype",
    "model.param_dtype": "weight dtype",
    "model.scan_layers": "one compiled layer under lax.scan",
    "model.remat_policy": "unused by generation; kept for a model section shared with training",
    "model.random_init": "random weights (tests): saved once as workdir/base_model",
    "model.overrides": "HF config fields replacing the checkpoint's (random_init only)",
}
SAMPLING_KEYS = {
    "sampling.max_new_tokens": "tokens generated per completion",
    "sampling.temperature": "sampling temperature (0: greedy)",
    "sampling.top_k": "sample among the k most likely tokens (0: off)",
    "sampling.top_p": "nucleus sampling mass (1: off)",
}


class PipelineError(ValueError):
  """A bad pipeline config or workdir; the message names the key, file or row."""


# ----------------------------------------------------------------------------- config


def model_section(name_or_path: str = "bundled:smollm2-135m-instruct") -> ml_collections.ConfigDict:
  """The `model.*` keys (as in configs/base.py) of a pipeline's generating model."""
  return ml_collections.ConfigDict({
      "name_or_path": name_or_path, "dtype": "float32", "param_dtype": "float32",
      "scan_layers": True, "remat_policy": "none", "random_init": False,
      "overrides": ml_collections.ConfigDict()})


def pipeline_section(name: str, batch_size: int = 8) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "name": name, "max_rows": 0, "max_seconds": 0.0, "batch_size": batch_size,
      "generate_batch_size": 64, "progress_bar": True})


def data_section(train="builtin:arithmetic") -> ml_collections.ConfigDict:
  """The prompt source: `data.train` is untyped (a path, a builtin task, rows or specs), as in
  jaxpost/data/config.py."""
  c = ml_collections.ConfigDict({"task_kind": "prompt", "columns": ml_collections.ConfigDict()})
  c.train = ml_collections.FieldReference(train, field_type=object)
  return c


def sampling_section(max_new_tokens: int = 64, temperature: float = 0.7):
  return ml_collections.ConfigDict({"max_new_tokens": max_new_tokens,
                                    "temperature": temperature, "top_k": 0, "top_p": 1.0})


def check_keys(config, defaults, docs: Mapping[str, str], where: str, also_known=()):
  """Fails on a key of `config` that the pipeline's defaults (or `also_known`) lack (a typo from
  Python: a ConfigDict accepts new attributes), naming the nearest known keys."""
  known = set(config_keys.flatten(defaults, docs)) | set(also_known)
  for key in config_keys.flatten(config, docs):
    if key not in known and not any(key.startswith(k + ".") for k in known):
      raise PipelineError(f"{where}: {config_keys.unknown_key_message(key, sorted(known))}")


def plain(config) -> dict:
  """A JSON-able dict of a ConfigDict (rows given from Python are summarised)."""
  def clean(v):
    if isinstance(v, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
      v = v.to_dict()
    if isinstance(v, Mapping):
      return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      if len(v) > 8 and all(isinstance(x, Mapping) for x in v):
        return f"<{len(v)} rows, sha256 {_digest(v)[:16]}>"
      return [clean(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
      return v
    return repr(v)
  return clean(config)


def _digest(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()


def fingerprint(config) -> dict:
  """{dotted key: value} of the config minus RESUMABLE_KEYS: what a resumed run must share."""
  flat = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, Mapping) and v:
        walk(v, f"{prefix}{k}.")
      else:
        flat[prefix + k] = v
  walk(plain(config), "")
  return {k: v for k, v in flat.items() if k not in RESUMABLE_KEYS}


# ----------------------------------------------------------------------------- files


def atomic_write(path, text: str):
  """Writes `path` through a temporary file in the same folder and an atomic rename."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def jsonl_text(rows: Iterable[Mapping]) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(path, rows: Iterable[Mapping]):
  atomic_write(path, jsonl_text(rows))


def read_jsonl(path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class UnitStore:
  """Committed units of a workdir (module docstring): rows in parts/, the list in state.json."""

  def __init__(self, workdir, config):
    self.root = Path(workdir)
    self.parts = self.root / "parts"
    self.path = self.root / STATE_FILE
    self.fingerprint = fingerprint(config)
    self.state = {"fingerprint": self.fingerprint, "units": {}, "order": []}
    if self.path.exists():
      self._resume(json.loads(self.path.read_text()))

  def _resume(self, saved: dict):
    old = saved.get("fingerprint", {})
    changed = [k for k in sorted(set(old) | set(self.fingerprint))
               if old.get(k) != self.fingerprint.get(k)]
    if changed:
      shown = "; ".join(f"{k}: {old.get(k)!r} -> {self.fingerprint.get(k)!r}" for k in changed[:4])
      raise PipelineError(f"{self.path} belongs to a run with another config ({shown}); use a new "
                          f"workdir or delete it")
    self.state = saved
    if saved["order"]:
      log.info("resuming %s: %d units already done", self.root, len(saved["order"]))

  def done(self, unit: str) -> bool:
    return unit in self.state["units"]

  def _part(self, unit: str) -> Path:
    return self.parts / (unit.replace("/", "__") + ".jsonl")

  def commit(self, unit: str, rows: Sequence[Mapping], stats: Optional[Mapping] = None,
             info: Optional[Mapping] = None):
    """Stores a finished unit: its rows, its filter counts and free-form `info`."""
    if rows:
      write_jsonl(self._part(unit), rows)
    entry = {"rows": len(rows), "stats": dict(stats or {}), "info": dict(info or {})}
    state = {**self.state, "units": {**self.state["units"], unit: entry},
             "order": [u for u in self.state["order"] if u != unit] + [unit]}
    atomic_write(self.path, json.dumps(state, indent=1))
    self.state = state

  def rows(self, unit: str) -> list[dict]:
    return read_jsonl(self._part(unit)) if self.state["units"][unit]["rows"] else []

  def info(self, unit: str) -> dict:
    return self.state["units"][unit]["info"]

  def units(self, prefix: str = "") -> list[str]:
    return [u for u in self.state["order"] if u.startswith(prefix)]

  def stats(self, prefix: str = "") -> dict:
    """Counts per filter summed over the committed units whose id starts with `prefix`."""
    total = Counter()
    for u in self.units(prefix):
      total.update(self.state["units"][u]["stats"])
    return dict(total)

  def row_count(self, prefix: str = "") -> int:
    return sum(self.state["units"][u]["rows"] for u in self.units(prefix))

  def export(self, path, units: Sequence[str]) -> int:
    """Writes the rows of `units` (in that order) to `path` atomically; returns the row count."""
    rows = [r for u in units for r in self.rows(u)]
    write_jsonl(path, rows)
    return len(rows)


# ----------------------------------------------------------------------------- bounds, progress


@dataclasses.dataclass
class Budget:
  """`pipeline.max_rows` / `pipeline.max_seconds` (0: unbounded) from the start of this run."""
  max_rows: int = 0
  max_seconds: float = 0.0
  start: float = dataclasses.field(default_factory=time.perf_counter)

  @classmethod
  def of(cls, config) -> "Budget":
    return cls(int(config.pipeline.max_rows), float(config.pipeline.max_seconds))

  def stop_reason(self, rows: int) -> Optional[str]:
    if self.max_rows and rows >= self.max_rows:
      return f"pipeline.max_rows={self.max_rows} reached"
    if self.max_seconds and time.perf_counter() - self.start >= self.max_seconds:
      return f"pipeline.max_seconds={self.max_seconds:g} reached (rerun to continue)"
    return None

  def elapsed(self) -> float:
    return time.perf_counter() - self.start


def progress(total: int, desc: str, enabled: bool, initial: int = 0):
  """A tqdm bar (a no-op object when disabled)."""
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, dynamic_ncols=True)


def run_units(store: UnitStore, budget: Budget, units: Sequence[tuple], work, desc: str,
              progress_bar: bool) -> Optional[str]:
  """Runs `work(uid, payload)` (which commits unit `uid`) for every (uid, payload) not yet done,
  in order, under a progress bar; returns the bound that stopped it early, or None."""
  todo = [(uid, payload) for uid, payload in units if not store.done(uid)]
  with progress(len(units), desc, progress_bar, len(units) - len(todo)) as bar:
    for uid, payload in todo:
      reason = budget.stop_reason(store.row_count())
      if reason:
        return reason
      work(uid, payload)
      bar.update(1)
  return None


def batches(rows: Sequence, size: int, prefix: str) -> list[tuple]:
  """[(f"{prefix}u00000", rows[:size]), ...]: the units of a list of rows."""
  return [(f"{prefix}u{u:05d}", rows[i:i + size]) for u, i in enumerate(range(0, len(rows), size))]


# ----------------------------------------------------------------------------- manifest


def versions() -> dict:
  import flax
  import jax
  import transformers

  import jaxpost
  return {"jaxpost": jaxpost.__version__, "jax": jax.__version__, "flax": flax.__version__,
          "transformers": transformers.__version__, "numpy": np.__version__,
          "python": platform.python_version()}


def write_manifest(workdir, config, model: str, store: UnitStore, complete: bool,
                   timings: Mapping[str, float], **extra):
  """manifest.json: config, model, rows, counts per filter, timings, versions (module doc)."""
  manifest = {"pipeline": config.pipeline.name, "complete": complete, "model": model,
              "rows": store.row_count(), "counts": store.stats(), "timings": dict(timings),
              "versions": versions(), **extra, "config": plain(config)}
  atomic_write(Path(workdir) / MANIFEST_FILE, json.dumps(manifest, indent=1, default=repr))
  return manifest


# ----------------------------------------------------------------------------- model, generation


def load_generator(model_cfg, workdir, name_or_path: Optional[str] = None, seed: int = 0):
  """The generating LoadedModel. A `random_init` model is saved once as `workdir/base_model`
  (an HF directory, written to a temporary folder then renamed) and loaded from there, so that
  later rounds, a restart and training all see the same weights."""
  import jaxpost
  from jaxpost.train import sharding as sh
  from jaxpost.train.state import load_sharded
  if name_or_path is None and model_cfg.random_init:
    base = Path(workdir) / "base_model"
    if not (base / "config.json").exists():
      mesh = sh.build_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
      lm = load_sharded(model_cfg, mesh, sh.rules_of({}), seed=seed)
      tmp = base.with_name(f".base_model.tmp{os.getpid()}")
      jaxpost.save_model(lm, str(tmp))
      os.replace(tmp, base)
    name_or_path = str(base)
  name = name_or_path or model_cfg.name_or_path
  return jaxpost.load_model(name, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
                            scan_layers=model_cfg.scan_layers)


def unit_seed(seed: int, unit: str) -> int:
  """A 31-bit seed from the pipeline seed and a unit id (stable across processes)."""
  digest = hashlib.sha256(f"{seed}:{unit}".encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sample(lm, prompts: Sequence, n: int, sampling, seed: int, batch_size: int = 64,
           temperature: Optional[float] = None, max_new_tokens: Optional[int] = None,
           stop_strings: Sequence[str] = (), chat_template=None):
  """`n` completions of each prompt through `jaxpost.generate` (batched, bucketed) with the
  `sampling.*` keys (`temperature` / `max_new_tokens` replace theirs when given): a
  GenerateResult whose row i * n + j is sample j of prompt i."""
  from jaxpost.generate import generate
  return generate(lm, list(prompts),
                  max_new_tokens=int(max_new_tokens or sampling.max_new_tokens),
                  temperature=float(sampling.temperature if temperature is None else temperature),
                  top_k=int(sampling.top_k), top_p=float(sampling.top_p), n=n, seed=seed,
                  batch_size=batch_size, stop_strings=tuple(stop_strings),
                  chat_template=chat_template)


# ----------------------------------------------------------------------------- prompts, scoring


def seed_tasks_path() -> Path:
  """The project's own Self-Instruct seed tasks (shipped in the package)."""
  return Path(__file__).resolve().parents[1] / "data" / "seed_tasks.jsonl"


def prompt_rows(data_cfg, split: str = "train") -> list[dict]:
  """Every row of `data.train` with a prompt, normalised as the rollout algorithms read them
  (`prompt` plus the row's other columns); a bad row fails naming its source and row."""
  from jaxpost.data.formats import DataError, normalize_row
  from jaxpost.data.sources import parse_sources, read_rows
  cfg = {"task_kind": data_cfg.get("task_kind") or "prompt", "train_split": "train"}
  out = []
  for spec in parse_sources(data_cfg.train):
    for place, row in read_rows(spec, split, "prompt", cfg):
      if isinstance(row, DataError):
        raise PipelineError(f"data.train: {row}")
      try:
        out.extend(normalize_row(row, "prompt", spec.columns, *place))
      except DataError as err:
        raise PipelineError(f"data.train: {err}") from err
  if not out:
    raise PipelineError("data.train has no rows")
  return out


@dataclasses.dataclass
class TextScorer:
  """Scores completions with `reward.funcs` (jaxpost/rewards.py) and/or `reward.model` (a
  head="score" checkpoint scored on the prompt + completion tokens, as the rollout algorithms
  score their rows, jaxpost/algos/scoring.py): R = Σ_f w_f r_f (+ w_model · score)."""
  functions: Any
  model: Any
  model_params: Any
  _jitted: Any = None  # the reward model's jitted scores (compiled once per padded shape)

  @classmethod
  def from_config(cls, config, vocab_size: int) -> "TextScorer":
    from jaxpost.algos import scoring
    scoring.check_reward_keys(ml_collections.ConfigDict(
        {"reward": config.reward, "algorithm": config.pipeline.name}))
    ctx = types.SimpleNamespace(config=config, load=_load_scorer)
    params, model = scoring.load_reward_model(ctx, vocab_size)
    return cls(scoring.load_functions(config), model, params)

  def __call__(self, prompts: Sequence, texts: Sequence[str], columns: Mapping[str, Sequence],
               token_rows: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
    """float64 [N]: the total reward of each completion, NaN = unscorable."""
    from jaxpost.algos.scoring import as_completions
    total = None
    if self.functions is not None:
      total = self.functions(prompts, as_completions(list(prompts), list(texts)),
                             columns).total.astype(np.float64)
    if self.model is not None:
      weighted = self.model.weight * self._model_scores(token_rows)
      total = weighted if total is None else np.where(np.isnan(total), 0.0, total) + weighted
    return total

  def _model_scores(self, token_rows, batch: int = 16) -> np.ndarray:
    import jax
    from jaxpost.generate import bucket
    if self._jitted is None:
      self._jitted = jax.jit(self.model.scores)
    score = self._jitted
    out = []
    for i in range(0, len(token_rows), batch):
      chunk = token_rows[i:i + batch]
      width = bucket(max(len(r) for r in chunk), 16)
      ids = np.zeros((bucket(len(chunk)), width), np.int32)
      mask = np.zeros_like(ids)
      for j, r in enumerate(chunk):
        ids[j, :len(r)], mask[j, :len(r)] = r, 1
      mask[len(chunk):, 0] = 1
      out.append(np.asarray(score(self.model_params, {"input_ids": ids,
                                                      "attention_mask": mask}))[:len(chunk)])
    return np.concatenate(out).astype(np.float64)


def _load_scorer(name_or_path: str, head: str):
  import jaxpost
  return jaxpost.load_model(name_or_path, head=head)


def columns_of(rows: Sequence[Mapping], n: int, skip: Sequence[str] = ("prompt",)) -> dict:
  """The prompt rows' other columns, each repeated for the n samples of its row (the keyword
  lists a reward function receives); a column some rows lack fails naming the row."""
  names = [k for k in rows[0] if k not in skip]
  for i, r in enumerate(rows):
    missing = [k for k in names if k not in r]
    if missing:
      raise PipelineError(f"data.train: prompt row {i} has no column {missing[0]!r}, which other "
                          f"rows have")
  return {k: [r[k] for r in rows for _ in range(n)] for k in names}
