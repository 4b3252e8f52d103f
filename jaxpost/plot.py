"""Training curves of one or more runs, read from their metrics.jsonl, as one matplotlib figure.

    python scripts/plot.py --workdir=runs/dpo [--workdir=runs/dpo_lora ...] [--out=curves.png]
    fig = jaxpost.plot.plot_runs(["runs/sft", "runs/dpo"])        # a matplotlib Figure
    png = jaxpost.plot.save_curves(["runs/dpo"], "runs/dpo/curves.png")

One panel per entry of `PANELS` that some run logged, against the optimiser step: the loss, the
algorithm's key metrics (DPO reward accuracy and margin, reward-model accuracy and margin, SFT
token accuracy, RL reward, KL and completion length, distillation KL, held-out task accuracy),
the learning rate and tokens/s. Train records are solid lines, held-out evaluations (`eval/*`,
`task/*`) dashed with markers; each run has its own colour, named in the legend. The figure is
drawn on matplotlib's Agg canvas without pyplot: headless, no display and no global backend.

A finished run writes `workdir/curves.png` itself (`config.metrics.plot`, `write_run_curves`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Optional, Sequence

from jaxpost.train.metrics import read_records

log = logging.getLogger("jaxpost.plot")

CURVES_FILE = "curves.png"
COLUMNS = 3
PANEL_SIZE = (4.6, 3.2)  # inches per panel
TITLE_HEIGHT = 0.5  # inches above the panels for the run names


@dataclasses.dataclass(frozen=True)
class Panel:
  title: str
  keys: tuple  # metrics.jsonl keys drawn in this panel


PANELS = (
    Panel("loss", ("loss", "eval/loss")),
    Panel("reward accuracy", ("rewards/accuracies", "eval/rewards/accuracies", "accuracy",
                              "eval/accuracy")),  # DPO family; reward model
    Panel("reward margin", ("rewards/margins", "eval/rewards/margins", "margin", "eval/margin")),
    Panel("token accuracy", ("mean_token_accuracy", "eval/mean_token_accuracy")),  # SFT, KD
    Panel("reward", ("reward", "eval/reward")),  # GRPO, RLOO, PPO
    Panel("KL to the reference, per token", ("kl", "eval/kl")),
    Panel("KL to the reference, per sequence", ("objective/kl",)),  # PPO
    Panel("completion length", ("completions/mean_length", "eval/completions/mean_length")),
    Panel("KL(teacher || student)", ("distill/forward_kl", "eval/distill/forward_kl")),
    Panel("held-out task accuracy", ("task/accuracy",)),
    Panel("learning rate", ("learning_rate",)),
    Panel("tokens/s", ("tokens_per_sec",)),
)


@dataclasses.dataclass
class Run:
  label: str
  records: list


def load_runs(workdirs: Sequence, labels: Optional[Sequence[str]] = None) -> list:
  """A `Run` per workdir (FileNotFoundError naming one without metrics.jsonl). Labels default
  to the workdirs' folder names, or the paths as given when two names are the same."""
  workdirs = [str(w) for w in workdirs]
  if not workdirs:
    raise ValueError("no workdir to plot")
  if labels is None:
    names = [Path(w).name or w for w in workdirs]
    labels = names if len(set(names)) == len(names) else workdirs
  if len(labels) != len(workdirs):
    raise ValueError(f"{len(labels)} labels for {len(workdirs)} workdirs")
  return [Run(label, read_records(w)) for label, w in zip(labels, workdirs)]


def series(records: list, key: str) -> tuple:
  """(steps, values) of `key` over the records that hold a number for it (non-finite values,
  stored as strings like "nan", included as NaN)."""
  steps, values = [], []
  for record in records:
    value = record.get(key)
    if isinstance(value, bool) or value is None:
      continue
    try:
      value = float(value)
    except (TypeError, ValueError):
      continue
    steps.append(record["step"])
    values.append(value)
  return steps, values


def present_panels(runs: list) -> list:
  """The panels of `PANELS` for which at least one run logged at least one of the keys."""
  logged = {key for run in runs for record in run.records for key in record}
  return [panel for panel in PANELS if logged.intersection(panel.keys)]


def plot_runs(workdirs: Sequence, labels: Optional[Sequence[str]] = None):
  """The curves figure (module docstring) of the runs in `workdirs`; ValueError when none of
  them logged any plotted metric."""
  runs = load_runs(workdirs, labels)
  panels = present_panels(runs)
  if not panels:
    raise ValueError(f"nothing to plot: {', '.join(map(str, workdirs))} logged none of "
                     f"{sorted(k for p in PANELS for k in p.keys)}")
  fig, rows, columns = _empty_figure(len(panels))
  colors = [f"C{i % 10}" for i in range(len(runs))]
  for index, panel in enumerate(panels):
    _draw_panel(fig.add_subplot(rows, columns, index + 1), panel, runs, colors)
  fig.suptitle("  |  ".join(run.label for run in runs), y=1 - 0.15 / fig.get_figheight(),
               verticalalignment="top")
  return fig


def _empty_figure(panels: int) -> tuple:
  """(Figure, rows, columns) sized for `panels` panels in rows of COLUMNS, with fixed margins
  (inches as fractions) instead of a layout engine: the same look, and drawing stays cheap
  enough for the end of every run."""
  from matplotlib.figure import Figure

  rows, columns = math.ceil(panels / COLUMNS), min(COLUMNS, panels)
  width, height = PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows + TITLE_HEIGHT
  fig = Figure(figsize=(width, height))
  fig.subplots_adjust(left=0.75 / width, right=1 - 0.25 / width, bottom=0.55 / height,
                      top=1 - (TITLE_HEIGHT + 0.3) / height, wspace=0.3, hspace=0.55)
  return fig, rows, columns


def _draw_panel(ax, panel: Panel, runs: list, colors: list):
  for run, color in zip(runs, colors):
    for key in panel.keys:
      steps, values = series(run.records, key)
      if not steps:
        continue
      held_out = key.startswith(("eval/", "task/"))
      ax.plot(steps, values, color=color, linestyle="--" if held_out else "-",
              marker="o" if held_out or len(steps) == 1 else None, markersize=4,
              label=key if len(runs) == 1 else f"{run.label}: {key}")
  ax.set_title(panel.title)
  ax.set_xlabel("step")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")


def save_curves(workdirs: Sequence, out, labels: Optional[Sequence[str]] = None) -> Path:
  """Writes the runs' figure to the PNG `out` through a temporary file and a rename, so `out`
  is either the previous file or the complete new one; returns `out`."""
  out = Path(out)
  fig = plot_runs(workdirs, labels)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
  try:
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out)
  finally:
    tmp.unlink(missing_ok=True)
  return out


def write_run_curves(workdir) -> Optional[Path]:
  """The end of a finished run: `workdir/curves.png`, or None after a warning that names the
  error and the command to retry. The run's results (checkpoints, metrics, export) are complete
  before this is called and are never touched here, so a plot failure does not fail the run."""
  try:
    path = save_curves([workdir], Path(workdir) / CURVES_FILE)
  except Exception as err:  # pylint: disable=broad-except  # a by-product: warn, never fail
    log.warning("curves: could not write %s (%s: %s); the run itself is complete; retry with "
                "`python scripts/plot.py --workdir=%s`", Path(workdir) / CURVES_FILE,
                type(err).__name__, err, workdir)
    return None
  log.info("curves: %s", path)
  return path
