"""Instruction templates and examples-proportional mixtures (jaxpost/data/templates.py)."""

import collections

import pytest

from jaxpost.data import normalize_row
from jaxpost.data.formats import DataError
from jaxpost.data.templates import Template, mix, mixture_rates, render, render_pairs

NLI = [Template("Premise: {premise}\nHypothesis: {hypothesis}\nEntailed?{options_}", "{label}",
                "plain"),
       Template("Write a hypothesis that the premise entails: {premise}", "{hypothesis}",
                "inverted", inverted=True)]
def render_task(rows, templates, source, **kwargs):
  """The rendered rows of plain `rows` (metadata, none of their own columns); the first bad row
  raises."""
  pairs = [((source, i, "row"), row) for i, row in enumerate(rows)]
  out = [row for _, row in render_pairs(pairs, templates, source, drop={c for r in rows for c in r},
                                        **kwargs)]
  for row in out:
    if isinstance(row, DataError):
      raise row
  return out


ROWS = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": "yes", "options": ["yes", "no"]}
        for i in range(5)]


def test_render_zero_few_shot_options_and_inverted():
  assert render(ROWS[0], NLI[0]) == {
      "prompt": "Premise: p0\nHypothesis: h0\nEntailed?\n\nOPTIONS:\n- yes\n- no\n",
      "completion": "yes"}
  assert render(ROWS[0], NLI[0], with_options=False)["prompt"].endswith("Entailed?\n")
  few = render(ROWS[0], NLI[1], exemplars=ROWS[1:3])
  assert few["prompt"] == ("Write a hypothesis that the premise entails: p1\nh1\n\n"
                           "Write a hypothesis that the premise entails: p2\nh2\n\n"
                           "Write a hypothesis that the premise entails: p0\n")
  assert few["completion"] == "h0"
  rows = render_task(ROWS, NLI, "nli", seed=0, shots=(0, 2))
  assert {r["template"] for r in rows} == {"plain", "inverted"} and {r["shots"] for r in rows} \
      == {0, 2}
  assert all(r["prompt"].count("Premise: p") + r["prompt"].count("entails: p") == 1 + r["shots"]
             for r in rows)
  assert normalize_row(rows[0], "sft")[0]["completion"] == rows[0]["completion"]  # SFT-ready


def test_missing_field_names_source_row_and_field():
  bad = ROWS[:2] + [{"premise": "p", "label": "no"}]
  with pytest.raises(DataError, match=r"nli.jsonl row 2, column 'hypothesis': template 'plain' "
                                      r"needs field 'hypothesis'"):
    render_task(bad, NLI[:1], "nli.jsonl")


def test_two_task_mixture_with_cap_gives_the_stated_proportions():
  tasks = {"big": [{"t": "big", "i": i} for i in range(20000)],
           "small": [{"t": "small", "i": i} for i in range(2000)]}
  rates = mixture_rates({k: len(v) for k, v in tasks.items()}, cap=5000)
  assert rates == pytest.approx({"big": 5000 / 7000, "small": 2000 / 7000})
  rows = mix(tasks, 10000, cap=5000, seed=0)
  counts = collections.Counter(r["t"] for r in rows)
  assert len(rows) == 10000 and abs(counts["small"] - 10000 * 2 / 7) <= 1
  assert len({r["i"] for r in rows if r["t"] == "small"}) == 2000  # every small row, ~1.4 times
  first_half = collections.Counter(r["t"] for r in rows[:5000])
  assert abs(first_half["small"] / 5000 - 2 / 7) < 0.03  # interleaved, not blocked
  uncapped = collections.Counter(r["t"] for r in mix(tasks, 11000))
  assert uncapped == {"big": 10000, "small": 1000}


def test_mixture_pipeline_default_tasks(tmp_path):
  import jaxpost
  from jaxpost.pipelines import common
  c = jaxpost.configs.get("mixture")
  c.workdir, c.cap, c.num_rows = str(tmp_path), 100, 700
  report = jaxpost.pipelines.run(c)
  rows = common.read_jsonl(tmp_path / "data.jsonl")
  seeds = report["counts"]["task_rows/seed_tasks"]  # 24 < cap: examples-proportional
  assert report["rates"] == pytest.approx({"seed_tasks": seeds / (seeds + 100),
                                           "arithmetic": 100 / (seeds + 100)})
  assert abs(report["counts"]["rows/seed_tasks"] - 700 * seeds / (seeds + 100)) <= 1
  assert len(rows) == 700 and {r["template"] for r in rows} == {
      "instruction", "inverted", "question", "solve"}
  assert all(normalize_row(r, "sft") for r in rows[:50])
  c.tasks = [{"source": [{"a": "x"}], "templates": [{"prompt": "{b}", "completion": "{a}"}],
              "name": "t"}]
  c.workdir = str(tmp_path / "bad")
  with pytest.raises(common.PipelineError, match=r"config.tasks\[0\]: t row 0, column 'b'"):
    jaxpost.pipelines.run(c)
