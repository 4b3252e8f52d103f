"""SFT speed in detail: jaxpost vs TRL SFTTrainer on SmolLM2-135M (fp32), TRL per thread count.

    python benchmarks/sft.py [--steps=8] [--batch_size=8] [--length=64] [--trl_threads=1,2]

The suite's "sft" task (benchmarks/run.py: same batches, children, token-identity check and
columns) with more steps and TRL once per torch thread count in --trl_threads (torch's OpenMP
threads slow down sharply when other processes share the cores, so 1 thread can win on a busy
machine; the best TRL row is the yardstick). Writes benchmarks/results/sft.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).parent)]
import common  # noqa: E402
import run  # noqa: E402
import trainers  # noqa: E402

LEARNING_RATE = run.TASKS["sft"].lr


def compare(task: str, shape: tuple[int, int], steps: int, model_dir: str,
            trl_threads: list[int], workdir: Path, cfg, peak: float) -> tuple[list[list], float]:
  """The suite's `task` on `steps` batches of `shape` (batch, length): table rows (jaxpost,
  then TRL per thread count) and jaxpost's speed-up over the fastest TRL row."""
  inputs = run.task_inputs(run.TASKS[task], {run.TASKS[task].data: shape}, steps, {}, workdir)
  spec = {"task": task, "steps": steps, "model_dir": model_dir, **inputs}
  ours = run.run_impl({**spec, "threads": os.cpu_count()}, "jaxpost", workdir)
  refs = {t: run.run_impl({**spec, "threads": t}, "reference", workdir) for t in trl_threads}
  best = min(run.speedup(ours, refs[t]) for t in trl_threads)  # over the fastest TRL row
  rows = [run.table_row("jaxpost", spec, ours, f"**{best:.2f}x**", cfg, peak)]
  label = run.TASKS[task].reference
  rows += [run.table_row(f"{label} ({t} thread{'s' * (t != 1)})", spec, refs[t],
                         f"{run.speedup(ours, refs[t]):.2f}x", cfg, peak) for t in refs]
  return rows, best


def parse(defaults: dict):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name, value in defaults.items():
    parser.add_argument(f"--{name}", type=type(value), default=value)
  parser.add_argument("--trl_threads", default=f"1,{os.cpu_count()}",
                      help="torch thread counts to run TRL with (each is a row)")
  args = parser.parse_args()
  args.trl_threads = [int(t) for t in args.trl_threads.split(",")]
  return args


def model_and_peak():
  """The bundled model's LlamaConfig and the measured 2048² matmul FLOP/s (MFU peak)."""
  from jaxpost.hf import read_hf_config, resolve_model_dir
  from jaxpost.models.config import LlamaConfig
  cfg = LlamaConfig.from_hf(read_hf_config(resolve_model_dir(trainers.MODEL)))
  return cfg, common.measured_matmul_flops(), str(resolve_model_dir(trainers.MODEL))


def main():
  args = parse({"steps": 8, "batch_size": 8, "length": 64})
  cfg, peak, model_dir = model_and_peak()
  load = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    rows, best = compare("sft", (args.batch_size, args.length), args.steps, model_dir,
                         args.trl_threads, Path(tmp), cfg, peak)
  threads = ",".join(map(str, args.trl_threads))
  common.write_result(
      "sft", f"SFT: jaxpost vs TRL SFTTrainer, SmolLM2-135M fp32, B={args.batch_size}",
      f"python benchmarks/sft.py --steps={args.steps} --batch_size={args.batch_size} "
      f"--length={args.length} --trl_threads={threads}", [run.HEADER] + rows,
      f"jaxpost / best TRL tokens/s: **{best:.2f}x**. Built-in arithmetic rows, completion-only "
      f"loss, the same token ids and masks for both (asserted); AdamW lr {LEARNING_RATE}; "
      f"median over steps 2..{args.steps}. Columns as in the suite (benchmarks/run.py); MFU "
      f"peak = the measured 2048² fp32 matmul rate, {peak / 1e9:.0f} GFLOP/s. 1-minute load "
      f"average {load:.2f} before the run, {os.getloadavg()[0]:.2f} after. "
      f"{common.versions('jax', 'torch', 'transformers', 'trl')}.")


if __name__ == "__main__":
  main()
