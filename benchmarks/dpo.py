"""DPO speed in detail: jaxpost vs TRL DPOTrainer, SmolLM2-135M fp32, per length and thread count.

    python benchmarks/dpo.py [--steps=4] [--batch_size=4] [--lengths=128,512] [--trl_threads=1,2]

The suite's "dpo" task (benchmarks/run.py: DPO, Rafailov et al. 2023, arXiv:2305.18290, sigmoid
loss, beta 0.1, full fine-tune, reference = the initial policy) at each max length T in
--lengths, TRL once per torch thread count. For each T the preference pairs are the built-in
arithmetic task's with each prompt lengthened by solved examples until the longer side of its
pair would pass T (`trainers.filled_rows`), so the real tokens scale with T. Same batches,
children, token-identity check and columns as the suite. Writes benchmarks/results/dpo.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).parent)]
import common  # noqa: E402
import run  # noqa: E402
from sft import compare, model_and_peak, parse  # noqa: E402

LEARNING_RATE = run.TASKS["dpo"].lr
BETA = run.BETA


def main():
  args = parse({"steps": 4, "batch_size": 4, "lengths": "128,512"})
  cfg, peak, model_dir = model_and_peak()
  load = os.getloadavg()[0]
  rows, speedups = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for length in map(int, args.lengths.split(",")):
      length_rows, best = compare("dpo", (args.batch_size, length), args.steps, model_dir,
                                  args.trl_threads, Path(tmp), cfg, peak)
      rows += length_rows
      speedups.append(f"T={length}: **{best:.2f}x**")
  threads = ",".join(map(str, args.trl_threads))
  common.write_result(
      "dpo", f"DPO: jaxpost vs TRL DPOTrainer, SmolLM2-135M fp32, B={args.batch_size} pairs",
      f"python benchmarks/dpo.py --steps={args.steps} --batch_size={args.batch_size} "
      f"--lengths={args.lengths} --trl_threads={threads}", [run.HEADER] + rows,
      f"jaxpost / best TRL tokens/s: {', '.join(speedups)}. Sigmoid DPO, beta {BETA}, full "
      f"fine-tune, reference = initial policy, AdamW lr {LEARNING_RATE}; the same token ids and "
      f"[{args.batch_size}, T] padding for both (asserted); median over steps 2..{args.steps}. "
      "tokens/s counts real chosen+rejected tokens; MFU counts the padded step as 3 policy "
      f"forwards + 1 reference forward against the measured 2048² fp32 matmul rate, "
      f"{peak / 1e9:.0f} GFLOP/s. 1-minute load average {load:.2f} before the run, "
      f"{os.getloadavg()[0]:.2f} after (2-core machine, shared). "
      f"{common.versions('jax', 'torch', 'transformers', 'trl')}.")


if __name__ == "__main__":
  main()
