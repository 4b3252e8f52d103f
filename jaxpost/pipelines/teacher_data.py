"""Sequence-level knowledge distillation data (Kim & Rush 2016): a teacher's completions of a
prompt set, written as prompt/completion SFT rows for a student.

Word-level distillation matches the teacher's next-token distribution; sequence-level
distillation instead trains the student by plain SFT on ŷ ≈ argmax_y p_teacher(y | x), the
teacher's own output (greedy decoding here, `sampling.temperature=0`; or `num_samples` samples
at a temperature). Rows keep the prompt row's other columns plus `teacher` (the model) and
`finish_reason`; completions that hit `sampling.max_new_tokens` are dropped with
`drop_truncated` (counted as `truncated`), empty ones always (`empty`).

    python scripts/pipeline.py --config=configs/teacher_data.py --config.model.name_or_path=big/
    python scripts/train.py --config=configs/sft.py --config.data.train=runs/teacher_data/data.jsonl
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from jaxpost.pipelines import common
from jaxpost.pipelines.rejection_sampling import OWN_COLUMNS, _as_completions


class TeacherData:
  def __init__(self, config):
    from jaxpost.configs import teacher_data as recipe
    common.check_keys(config, recipe.get_config(), recipe.KEYS, "teacher_data")
    if config.num_samples < 1:
      raise common.PipelineError(f"config.num_samples must be >= 1, got {config.num_samples}")
    self.config, self.workdir = config, Path(config.workdir)
    self.store = common.UnitStore(self.workdir, config)
    self.budget = common.Budget.of(config)
    self.prompts = common.prompt_rows(config.data)
    self.lm = None

  def _unit(self, uid: str, batch: list[dict]):
    c, n = self.config, self.config.num_samples
    if self.lm is None:
      self.lm = common.load_generator(c.model, self.workdir, seed=c.seed)
    out = common.sample(self.lm, [r["prompt"] for r in batch], n, c.sampling,
                        common.unit_seed(c.seed, uid), c.pipeline.generate_batch_size)
    prompts = [r["prompt"] for r in batch for _ in range(n)]
    completions = _as_completions(prompts, out.texts)
    rows, counts = [], Counter()
    for i, (text, finish) in enumerate(zip(out.texts, out.finish_reasons)):
      why = "empty" if not text.strip() else (
          "truncated" if finish == "length" and c.drop_truncated else None)
      counts[why or "kept"] += 1
      if why is None:
        row = batch[i // n]
        rows.append({**{k: v for k, v in row.items() if k not in OWN_COLUMNS},
                     "prompt": row["prompt"], "completion": completions[i],
                     "teacher": c.model.name_or_path, "finish_reason": finish})
    self.store.commit(uid, rows, counts)

  def run(self) -> dict:
    c = self.config
    units = common.batches(self.prompts, c.pipeline.batch_size, "")
    stopped = common.run_units(self.store, self.budget, units, self._unit, "teacher",
                               c.pipeline.progress_bar)
    self.store.export(self.workdir / common.DATA_FILE, self.store.units())
    manifest = common.write_manifest(self.workdir, c, c.model.name_or_path, self.store,
                                     stopped is None, {"total": self.budget.elapsed()},
                                     stopped=stopped)
    return {"complete": stopped is None, "rows": manifest["rows"], "counts": manifest["counts"],
            "data": str(self.workdir / common.DATA_FILE), "stopped": stopped}


def run(config) -> dict:
  """Runs (or continues) teacher generation (configs/teacher_data.py); returns {"complete",
  "rows", "counts", "data", "stopped"}."""
  return TeacherData(config).run()
