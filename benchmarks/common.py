"""Shared benchmark plumbing: timing medians, peak memory, machine facts, result files.

Every benchmark writes `benchmarks/results/<name>.md` (a markdown section); `benchmarks/report.py`
joins them into BENCHMARKS.md under one header with the machine and library versions.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CPU_PEAK_FLOPS = 290e9  # 2048^2 f32 matmul on this 2-core CPU (DESIGN.md)


def timed(fn, repeats: int = 3, warmup: int = 1):
  """(first-call seconds, median seconds of `repeats` later calls); fn must block until done."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def measured_matmul_flops(n: int = 2048) -> float:
  """FLOP/s of a jitted n x n fp32 matmul on the default JAX device, measured now."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  _, seconds = timed(lambda: matmul(a).block_until_ready(), repeats=5)
  return 2 * n**3 / seconds


def step_timer(times: list):
  """A transformers TrainerCallback appending each optimiser step's seconds to `times`."""
  import transformers

  class StepTimer(transformers.TrainerCallback):
    def on_step_begin(self, *_, **__):
      self.start = time.perf_counter()

    def on_step_end(self, *_, **__):
      times.append(time.perf_counter() - self.start)

  return StepTimer()


def peak_rss_gb() -> float:
  """Peak resident memory of this process so far (GB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def versions(*packages: str) -> str:
  found = []
  for name in packages:
    try:
      found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
      pass
  return ", ".join(found)


def machine() -> str:
  import os
  return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def write_result(name: str, title: str, command: str, table: list[list], notes: str = ""):
  """Writes one markdown section: title, command, a table (first row = header), notes."""
  RESULTS.mkdir(parents=True, exist_ok=True)
  header, *rows = table
  lines = [f"## {title}", "", f"`{command}` — {time.strftime('%Y-%m-%d')}, {machine()}", "",
           "| " + " | ".join(map(str, header)) + " |",
           "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
  if notes:
    lines += ["", notes]
  text = "\n".join(lines) + "\n"
  (RESULTS / f"{name}.md").write_text(text)
  print(text)
