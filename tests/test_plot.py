"""Training curves (jaxpost/plot.py, scripts/plot.py) from the metrics.jsonl of real tiny runs."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import jaxpost
from jaxpost import configs, plot
from jaxpost.train.metrics import read_records

ROOT = Path(__file__).parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DPO_PANELS = ["loss", "reward accuracy", "reward margin", "held-out task accuracy",
              "learning rate", "tokens/s"]
GRPO_PANELS = ["loss", "reward", "completion length", "held-out task accuracy", "learning rate",
               "tokens/s"]


def _tiny_run(recipe: str, workdir: Path, **overrides) -> dict:
  config = configs.get(recipe)
  config.workdir = str(workdir)
  config.metrics.progress_bar = False
  for key, value in overrides.items():
    setattr(config, key, value)
  return jaxpost.train(config)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
  """A 4-step tiny DPO run: train records at steps 2 and 4, evaluations at 0 and 4."""
  workdir = tmp_path_factory.mktemp("plot") / "dpo"
  _tiny_run("dpo:tiny", workdir, max_steps=4, log_every=2)
  return workdir


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
  """A 2-iteration tiny GRPO run whose curves.png path is taken by a folder, so the run's own
  plot fails: the run must still finish, warn, and leave the folder alone."""
  workdir = tmp_path_factory.mktemp("plot") / "grpo"
  (workdir / "curves.png").mkdir(parents=True)
  logger = logging.getLogger("jaxpost.plot")
  handler = _Collect()
  logger.addHandler(handler)
  try:
    out = _tiny_run("grpo:tiny", workdir, max_steps=2, log_every=1)
  finally:
    logger.removeHandler(handler)
  return workdir, out, handler.messages


class _Collect(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def _titles(fig) -> list:
  return [ax.get_title() for ax in fig.axes]


def test_a_finished_run_writes_its_curves_png(dpo_run):
  png = dpo_run / "curves.png"
  data = png.read_bytes()
  assert data.startswith(PNG_MAGIC) and len(data) > 10_000
  assert not list(dpo_run.glob(".curves.png.tmp*"))
  fig = plot.plot_runs([dpo_run])
  assert _titles(fig) == DPO_PANELS
  steps = {title: [list(line.get_xdata()) for line in ax.get_lines()]
           for title, ax in zip(_titles(fig), fig.axes)}
  assert steps["loss"] == [[2, 4], [0, 4]]  # train loss, then eval/loss
  assert steps["held-out task accuracy"] == [[0, 4]]
  loss_labels = [line.get_label() for line in fig.axes[0].get_lines()]
  assert loss_labels == ["loss", "eval/loss"]
  records = read_records(dpo_run)
  assert list(fig.axes[0].get_lines()[0].get_ydata()) == [r["loss"] for r in records if "loss" in r]


def test_rl_panels_and_a_failed_plot_only_warns(grpo_run):
  workdir, out, warnings = grpo_run
  assert out["step"] == 2 and not out["preempted"]
  assert (workdir / "curves.png").is_dir() and not list((workdir / "curves.png").iterdir())
  assert len(warnings) == 1 and "IsADirectoryError" in warnings[0]
  assert f"scripts/plot.py --workdir={workdir}" in warnings[0]
  assert not list(workdir.glob(".curves.png.tmp*"))
  assert _titles(plot.plot_runs([workdir])) == GRPO_PANELS


def test_several_runs_overlaid_with_a_legend(dpo_run, grpo_run, tmp_path):
  """scripts/plot.py with two --workdir: the union of their panels, one colour per run."""
  out = tmp_path / "both.png"
  proc = subprocess.run([sys.executable, "scripts/plot.py", f"--workdir={dpo_run}",
                         f"--workdir={grpo_run[0]}", f"--out={out}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert out.read_bytes().startswith(PNG_MAGIC)
  fig = plot.plot_runs([dpo_run, grpo_run[0]])
  assert _titles(fig) == ["loss", "reward accuracy", "reward margin", "reward",
                          "completion length", "held-out task accuracy", "learning rate",
                          "tokens/s"]
  lines = fig.axes[0].get_lines()
  assert [line.get_label() for line in lines] == ["dpo: loss", "dpo: eval/loss", "grpo: loss"]
  assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()
  assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
      "dpo: loss", "dpo: eval/loss", "grpo: loss"]


def test_a_workdir_without_metrics_fails_naming_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no metrics.jsonl"):
    plot.plot_runs([tmp_path])
  proc = subprocess.run([sys.executable, "scripts/plot.py", f"--workdir={tmp_path}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and f"plot.py: {tmp_path}: no metrics.jsonl" in proc.stderr


def test_records_skip_a_torn_last_line_and_name_a_bad_one(tmp_path):
  good = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": "nan"}]
  lines = [json.dumps(r) for r in good]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "lo')
  assert read_records(tmp_path) == good
  assert plot.series(good, "loss")[0] == [1, 2]  # "nan" (a non-finite value) is kept as NaN
  (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n[1, 2]\n" + lines[1] + "\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
    read_records(tmp_path)
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "grad_norm": 1.0}) + "\n")
  with pytest.raises(ValueError, match="nothing to plot"):
    plot.plot_runs([tmp_path])
