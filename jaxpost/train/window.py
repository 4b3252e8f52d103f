"""The metric window of the loop: step metrics stay on device until a log boundary, where
`MetricWindow.flush` fetches them in one transfer, checks every step, and writes one averaged
record with the window's throughput.

A step whose loss, gradient, update or new parameters are non-finite, or whose update is a
blow-up (||update|| > max_update_ratio x ||params||), raises `NonFiniteError` naming the step.
Throughput counts the timed steps only (not the first, mostly compilation, whose time is logged
once as `compile_time`), less the seconds a later step reports compiling under the step metric
`time/compile` (a rollout update compiled for a new shape; summed over the window):

    step_time = elapsed / steps      tokens_per_sec = real tokens / elapsed
    mfu = model FLOPs / elapsed / (devices x peak FLOP/s per device)
"""

from __future__ import annotations

import time

import jax
import numpy as np

from jaxpost.train.metrics import peak_flops_per_device


COMPILE_TIME = "time/compile"  # a step metric: seconds the step spent compiling


class NonFiniteError(FloatingPointError):
  """A step went non-finite or blew up; raised at the next log or checkpoint boundary."""


class MetricWindow:
  """Pending step metrics since the last flush, and the run's token count."""

  def __init__(self, config, writer, ckpt, loader, finalize=None):
    self.config, self.writer, self.ckpt, self.loader = config, writer, ckpt, loader
    self.finalize = finalize
    self.pending = []  # (step, device metrics, flops, timed)
    self.last = {}
    self.num_tokens, self.compile_time = 0.0, None
    self.restart()

  def restart(self):
    """Starts the clock of the window (after a flush, an eval or compilation)."""
    self.start = time.perf_counter()

  def add(self, step: int, metrics: dict, flops: float, first: bool):
    """Records a step; the first step of a run syncs once and is timed as compilation."""
    if first:
      jax.block_until_ready(metrics)
      self.compile_time = time.perf_counter() - self.start
      self.restart()
    self.pending.append((step, metrics, flops, not first))

  def flush(self, step: int):
    """Fetches pending metrics, stops on a non-finite step, writes the averaged record."""
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m, _, _ in self.pending])
    elapsed = time.perf_counter() - self.start
    self.ckpt.check()
    for (s, _, _, _), m in zip(self.pending, fetched):
      self._check_step(s, m)
    record = {k: float(np.mean([m[k] for m in fetched]))
              for k in fetched[0] if k not in ("finite", "tokens", "flops", COMPILE_TIME)}
    compiling = sum(float(m.get(COMPILE_TIME, 0.0)) for m in fetched)
    if compiling:
      record[COMPILE_TIME] = compiling
    record["learning_rate"] = float(fetched[-1]["learning_rate"])
    timed = [(m, float(m.get("flops", f))) for (_, _, f, t), m in zip(self.pending, fetched)
             if t]
    if timed:
      record.update(self._throughput(timed, elapsed))
    if self.compile_time is not None:
      record["compile_time"], self.compile_time = self.compile_time, None
    self.num_tokens += sum(float(m["tokens"]) for m in fetched)
    record["num_tokens"] = self.num_tokens
    if hasattr(self.loader, "epoch"):
      record["epoch"] = self.loader.epoch
    if self.finalize:
      record = self.finalize(record)
    self.writer.write(step, record)
    self.writer.advance(len(self.pending))
    self.last = record
    self.pending = []
    self.restart()

  def _check_step(self, step: int, m: dict):
    """`NonFiniteError` if step `step` went non-finite or its update blew up."""
    ratio = self.config.get("max_update_ratio", 0.0)
    exploded = ratio > 0 and m["update_norm"] > ratio * m["param_norm"]
    if m["finite"] and not exploded:
      return
    what = (f"update_norm {m['update_norm']:.4g} > max_update_ratio={ratio} x param_norm "
            f"{m['param_norm']:.4g}" if m["finite"] else "non-finite values")
    raise NonFiniteError(
        f"Training diverged at step {step} ({what}; loss={m['loss']}, grad_norm="
        f"{m['grad_norm']}, update_norm={m['update_norm']}, param_norm={m['param_norm']}); "
        f"stopping without checkpointing it. Last checkpoint: step {self.ckpt.latest_step()} in "
        f"{self.ckpt.directory}")

  def _throughput(self, timed, elapsed: float) -> dict:
    """step_time, tokens_per_sec (real tokens) and MFU over the timed steps of a window."""
    elapsed -= sum(float(m.get(COMPILE_TIME, 0.0)) for m, _ in timed)
    tokens = sum(float(m["tokens"]) for m, _ in timed)
    flops = sum(f for _, f in timed)
    peak = jax.device_count() * peak_flops_per_device(self.config.metrics.cpu_peak_flops)
    return {"step_time": elapsed / len(timed), "tokens_per_sec": tokens / elapsed,
            "mfu": flops / elapsed / peak}
