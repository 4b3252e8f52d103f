"""Sequence-level distillation data (jaxpost/pipelines/teacher_data.py) from a tiny teacher."""

import jaxpost
from jaxpost.pipelines import common, teacher_data

ROWS = [{"prompt": f"Say the number {i}.", "topic": "numbers"} for i in range(6)]


def test_teacher_rows_and_truncation_filter(tmp_path):
  c = jaxpost.configs.get("teacher_data:tiny")
  c.workdir, c.data.train, c.num_samples = str(tmp_path / "a"), ROWS, 2
  c.pipeline.progress_bar = False
  report = teacher_data.run(c)
  rows = common.read_jsonl(tmp_path / "a" / "data.jsonl")
  assert report["complete"] and len(rows) == 12 == report["counts"]["kept"]
  assert [r["prompt"] for r in rows[::2]] == [r["prompt"] for r in ROWS]
  assert all(r["topic"] == "numbers" and r["completion"] and r["teacher"] for r in rows)
  c.workdir, c.drop_truncated = str(tmp_path / "b"), True  # a random teacher never stops
  report = teacher_data.run(c)
  assert report["rows"] == 0 and report["counts"]["truncated"] == 12
