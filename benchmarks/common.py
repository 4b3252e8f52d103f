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


def train_step_flops(cfg, rows: int, length: int, frozen_weights: bool = False,
                     reference: bool = False, score_head: bool = False) -> float:
  """Model FLOPs of one training step on [rows, length] (padded), from
  `forward_flops_per_token` F = W (weight matmuls) + A (attention scores and values):

    full finetuning   3F per token: forward, activation gradients, weight gradients
    frozen weights    2W + 3A (LoRA: no weight gradients for the base; attention has no
                      weights, so its backward is still 2x; the rank-r adapters are not counted)
    + reference       + F (one more forward, e.g. DPO's frozen reference)

  A score head (reward model) is a [D, 1] projection, so the LM head is left out."""
  from jaxpost.models.config import forward_flops_per_token
  if score_head:
    cfg = cfg.replace(vocab_size=1)
  weights = forward_flops_per_token(cfg, 0)
  attention = forward_flops_per_token(cfg, length) - weights
  per_token = (2 if frozen_weights else 3) * weights + 3 * attention
  if reference:
    per_token += weights + attention
  return per_token * rows * length


def generate_flops(cfg, batch: int, prompt_len: int, new_tokens: int) -> float:
  """Model FLOPs of greedy generation: the prompt's forward (which yields the first new token)
  and `new_tokens - 1` one-token forwards; attention is linear in the context, so the decode
  steps cost as many tokens at the mean context length."""
  from jaxpost.models.config import forward_flops_per_token
  decode = (new_tokens - 1) * forward_flops_per_token(cfg, prompt_len + new_tokens / 2)
  return batch * (prompt_len * forward_flops_per_token(cfg, prompt_len) + decode)


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
  """CPU model (from /proc/cpuinfo where there is one), core count and OS."""
  import os
  cpu = platform.processor() or platform.machine()
  info = Path("/proc/cpuinfo")
  if info.exists():
    names = [l.split(":", 1)[1].strip() for l in info.read_text().splitlines()
             if l.startswith("model name")]
    cpu = names[0] if names else cpu
  return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def write_result(name: str, title: str, command: str, table: list[list], notes: str = "",
                 save: bool = True):
  """Writes one markdown section: title, command, a table (first row = header), notes; with
  `save=False` only prints it."""
  RESULTS.mkdir(parents=True, exist_ok=True)
  header, *rows = table
  lines = [f"## {title}", "", f"`{command}` — {time.strftime('%Y-%m-%d')}, {machine()}", "",
           "| " + " | ".join(map(str, header)) + " |",
           "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
  if notes:
    lines += ["", notes]
  text = "\n".join(lines) + "\n"
  if save:
    (RESULTS / f"{name}.md").write_text(text)
  print(text)


def emit_result(result: dict):
  """Prints a child process's result as the one `RESULT {json}` line `child_result` reads."""
  import json
  print("RESULT " + json.dumps(result), flush=True)


def child_result(cmd: list, what: str, cwd=None) -> dict:
  """Runs `cmd` (a benchmark child process) and returns the dict of its `RESULT` line; raises
  with the end of its stderr, naming `what`, when it fails or prints none."""
  import json
  import subprocess
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
  out = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  if proc.returncode or not out:
    raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(out[-1][len("RESULT "):])
