"""Run logging (metrics.jsonl, TensorBoard, optional W&B, progress bar) and FLOP accounting.

Model FLOPs per trained token position of a decoder with N matmul parameters (embedding lookup
excluded, output projection included), L layers, H query heads of size d and sequence length T
(PaLM, Chowdhery et al. 2022, appendix B):

    6 N + 12 L H d T       (forward + backward; rematerialisation is not counted)

MFU = model FLOPs per second / (devices x peak FLOP/s per device). Peaks are dense bf16 figures
by device kind; on CPU `config.metrics.cpu_peak_flops` is the whole host's peak, shared by its
(possibly fake) devices.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax

from jaxpost.models.config import forward_flops_per_token

# Dense bf16 peak FLOP/s per device, matched as a substring of `device.device_kind` (lower case).
PEAK_FLOPS = (
    ("v6 lite", 918e12), ("v6e", 918e12), ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12),
    ("v4", 275e12), ("v3", 123e12), ("v2", 45e12),
    ("gb200", 2450e12), ("b200", 2250e12), ("h200", 989e12), ("h100", 989e12), ("h800", 989e12),
    ("gh200", 989e12), ("a100", 312e12), ("a800", 312e12), ("l40s", 362e12), ("l4", 121e12),
    ("a10g", 70e12), ("a10", 125e12), ("v100", 125e12), ("t4", 65e12),
    ("mi300", 1307e12), ("mi250", 362e12),
)


def peak_flops_per_device(cpu_peak_flops: float) -> float:
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    return cpu_peak_flops / jax.local_device_count()
  kind = device.device_kind.lower()
  for name, peak in PEAK_FLOPS:
    if name in kind:
      return peak
  return float("nan")


def train_flops(cfg, batch: dict, weight_grads: bool = True) -> float:
  """Model FLOPs of one training step on `batch` (every `*input_ids` field is a forward):
  forward F, backward 2F (activation + weight gradients), or F when the weights are frozen
  (LoRA: the adapters' own FLOPs are < 1% and not counted)."""
  factor = 3 if weight_grads else 2
  total = 0.0
  for key, ids in batch.items():
    if key.endswith("input_ids"):
      rows, length = ids.shape
      total += factor * forward_flops_per_token(cfg, length) * rows * length
  return total


# Record keys already under a namespace; every other scalar is a train metric.
NAMESPACES = ("eval/", "task/")


def dashboard_tag(key: str) -> str:
  """TensorBoard / W&B name of a record key: train metrics under `train/` (`train/loss`,
  `train/rewards/chosen`), eval and task-report metrics as they are (`eval/loss`)."""
  return key if key.startswith(NAMESPACES) else f"train/{key}"


class MetricsWriter:
  """Writes workdir/metrics.jsonl (plain keys: `loss`, `eval/loss`), TensorBoard events and (if
  enabled and installed) W&B (`dashboard_tag` names), on process 0 only; other processes get a
  no-op writer.

  A run resumed at step S > 0 first drops the metrics.jsonl records past S (steps a killed run
  logged after its last checkpoint, which the resumed run logs again) and opens TensorBoard with
  `purge_step=S + 1`, which hides the old events from step S + 1 on; a run starting at step 0
  drops every earlier record. The step progress bar starts at `start_progress()` (after the
  pre-training eval), so its rate is training steps only."""

  def __init__(self, config, workdir: Path, total_steps: int, initial_step: int):
    self.active = jax.process_index() == 0
    self._tb = self._wandb = self._bar = None
    self._bar_args = dict(total=total_steps, initial=initial_step, desc=config.algorithm)
    self._show_bar = bool(config.metrics.progress_bar)
    if not self.active:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    keep_until = initial_step if initial_step > 0 else -1
    self._jsonl = _open_truncated(workdir / "metrics.jsonl", keep_until)
    if config.metrics.tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=keep_until + 1)
    if config.metrics.wandb:
      self._wandb = _start_wandb(config)

  def start_progress(self):
    if self.active and self._show_bar and self._bar is None:
      from tqdm import tqdm
      self._bar = tqdm(dynamic_ncols=True, **self._bar_args)

  def write(self, step: int, metrics: dict):
    if not self.active:
      return
    record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    scalars = {dashboard_tag(k): v for k, v in record.items()
               if k != "step" and isinstance(v, float)}
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(scalars, step=step)
    if self._bar is not None and "loss" in metrics:
      self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)

  def advance(self, steps: int):
    if self._bar is not None:
      self._bar.update(steps)

  def close(self):
    if not self.active:
      return
    self._jsonl.close()
    for handle in (self._tb, self._bar):
      if handle is not None:
        handle.close()
    if self._wandb is not None:
      self._wandb.finish()


def _open_truncated(path: Path, keep_until: int):
  """`path` opened for appending, after dropping its records with step > keep_until."""
  if path.exists():
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _record_step(line) <= keep_until]
    if len(kept) < len(lines):
      path.write_text("".join(kept))
  return open(path, "a")


def read_records(workdir) -> list:
  """The records of `workdir`/metrics.jsonl in file order. A torn last line (the run was killed
  while writing it) is skipped; any other line that is not a JSON object with a `step` fails
  naming the file and line. FileNotFoundError names the workdir when it has no metrics.jsonl."""
  path = Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"{workdir}: no metrics.jsonl (not a run's workdir, or the run has "
                            "not logged a step yet)")
  lines = path.read_text().splitlines()
  records = []
  for number, line in enumerate(lines, 1):
    if _record_step(line) == math.inf:
      if number == len(lines):
        break
      raise ValueError(f"{path}:{number}: not a metrics record (a JSON object with a step): "
                       f"{line[:80]!r}")
    records.append(json.loads(line))
  return records


def _record_step(line: str) -> float:
  """The step of a metrics.jsonl line; inf for a torn last line (written while killed)."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return math.inf


def progress(items, total: int, desc: str, enabled: bool):
  """`items` with a transient tqdm bar on process 0 when `enabled`, else as they are."""
  if not enabled or jax.process_index() != 0:
    return items
  from tqdm import tqdm
  return tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _jsonable(value):
  if isinstance(value, (int, str, bool)):
    return value
  value = float(value)
  return value if math.isfinite(value) else str(value)


def _start_wandb(config):
  try:
    import wandb
  except ImportError:
    print("config.metrics.wandb=True but wandb is not installed; skipping W&B logging")
    return None
  return wandb.init(project=config.metrics.wandb_project, config=config.to_dict(),
                    dir=str(config.workdir), name=os.path.basename(str(config.workdir)))
