"""Memory of a distillation step vs an SFT step of the same student (SmolLM2-135M teacher).

    python benchmarks/distill_memory.py [--steps=3]

The student is the bundled SmolLM2-135M-Instruct's every other layer (15 of 30,
`jaxpost.models.student.build_student`, written once to a temporary directory). Two rows, each
one `jaxpost.train(config)` in a fresh child process (the RSS high-water mark is per process),
fp32, `remat_policy="none"`, chunk 32, B=8 rows x T=256 packed rows of the built-in arithmetic
task, no evaluation:

  sft      configs/sft.py on the student
  distill  configs/distill.py: the same student, the frozen 135M teacher (fp32 = the compute
           dtype), forward KL on the completion tokens

Reported as benchmarks/memory.py does (its `train_with_analysis`): peak RSS, RSS before the
train step compiles, XLA's memory analysis of the compiled step (temp: activations, gradients,
workspace; arguments: params, optimiser state, frozen trees, batch) and the median step time.
The teacher adds its weights to the arguments and its forward to the temp buffers, but keeps no
activations for a backward pass and never materialises [B, T, V] logits (losses/distill.py), so
the temp memory must not double.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from common import child_result, emit_result, peak_rss_gb, versions, write_result  # noqa: E402

TEACHER = "bundled:smollm2-135m-instruct"
ROWS = ("sft", "distill")


BATCH, LENGTH = 8, 256


def run_config(row: str, student_dir: str, workdir: str, steps: int):
  from jaxpost import configs
  c = configs.get(row)
  c.update_from_flattened_dict({
      "model.name_or_path": student_dir, "workdir": workdir, "max_steps": steps,
      "batch_size": BATCH, "data.max_length": LENGTH, "data.packing": True,
      "data.eval": "", "eval_at_start": False, "report.task": "", "log_every": 1,
      "checkpoint.every": -1, "metrics.progress_bar": False, "metrics.tensorboard": False,
      "model.dtype": "float32", "model.param_dtype": "float32", "model.remat_policy": "none",
      "logprob_chunk_size": 32})
  if row == "distill":
    c.student.init = ""
    c.teacher.name_or_path = TEACHER
  return c


def child(args):
  from memory import train_with_analysis
  with tempfile.TemporaryDirectory() as workdir:
    result = train_with_analysis(run_config(args.child, args.student, workdir, args.steps))
    records = [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]
  records = [r for r in records if "loss" in r]
  emit_result({**result, "rss_gb": peak_rss_gb(), "loss": records[0]["loss"],
               "step_times": [r["step_time"] for r in records[1:]]})


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--student", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args)
  from jaxpost.models.student import build_student
  with tempfile.TemporaryDirectory() as tmp:
    student = str(build_student(TEACHER, "teacher_layers:every_other", Path(tmp) / "student"))
    results = {}
    for row in ROWS:
      cmd = [sys.executable, __file__, f"--child={row}", f"--student={student}",
             f"--steps={args.steps}"]
      results[row] = child_result(cmd, row, cwd=ROOT)
      print(row, results[row], file=sys.stderr, flush=True)
  table = [["step", "peak RSS GB", "RSS before compile GB", "XLA temp GB", "XLA args GB",
            "step s (median)", "step-1 loss"]]
  for row, r in results.items():
    table.append([row, f"{r['rss_gb']:.2f}", f"{r['rss_marks']['before_compile']:.2f}",
                  f"{r['xla']['temp']:.2f}", f"{r['xla']['argument']:.2f}",
                  f"{statistics.median(r['step_times']):.1f}", f"{r['loss']:.4f}"])
  notes = (f"Student = SmolLM2-135M's every other layer; B={BATCH} x T={LENGTH} packed, fp32, "
           f"{args.steps} steps (step 1 compiles); "
           "2 cores shared with other jobs, so step times are noisy. "
           f"{versions('jax', 'flax', 'optax')}.")
  write_result("distill_memory", "Distillation step vs SFT step: memory of the same student",
               f"python benchmarks/distill_memory.py --steps={args.steps}", table, notes)


if __name__ == "__main__":
  main()
