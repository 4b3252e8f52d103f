"""Data pipeline throughput: tokenisation (+ normalisation, masks) and batching, rows/s on CPU.

    python benchmarks/data.py [--rows 20000] [--batch 32] [--max_length 1024]

20k synthetic multi-turn conversations (1-3 user/assistant exchanges, ~60-400 tokens) rendered
with the bundled SmolLM2 tokenizer and chat template; masks for all assistant turns. Prints a
markdown table row per stage and writes them to benchmarks/results/data.md.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import versions, write_result  # noqa: E402

from jaxpost.data import build_loader, data_defaults  # noqa: E402
from jaxpost.hf import load_tokenizer, resolve_model_dir  # noqa: E402

WORDS = ("the model learns from data and each step of training updates weights with gradients "
         "computed on batches of tokens so that loss goes down over time while evaluation "
         "tracks accuracy").split()


def make_rows(n: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  text = lambda lo, hi: " ".join(rng.choice(WORDS, rng.integers(lo, hi))).capitalize() + "."
  rows = []
  for _ in range(n):
    msgs = []
    for _ in range(rng.integers(1, 4)):
      msgs += [{"role": "user", "content": text(5, 30) + "?"},
               {"role": "assistant", "content": text(10, 90)}]
    rows.append({"messages": msgs})
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", type=int, default=20000)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--max_length", type=int, default=1024)
  args = ap.parse_args()
  tok = load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))
  rows = make_rows(args.rows)
  cfg = data_defaults()
  cfg.train, cfg.max_length, cfg.prefetch = rows, args.max_length, 0
  cfg.buckets = [128, 256, 512, args.max_length]
  results = []
  t0 = time.perf_counter()
  loader = build_loader(cfg, tok, "sft", args.batch, process_index=0, process_count=1)
  tok_s = time.perf_counter() - t0
  s = loader.summary
  results.append(("tokenise (normalise + template + masks)", args.rows / tok_s, tok_s))
  for packing in (False, True):
    cfg.packing = packing
    loader = build_loader(cfg, tok, "sft", args.batch, process_index=0, process_count=1) \
        if packing else loader
    t0, n, real = time.perf_counter(), 0, 0
    while loader.state()["cursor"] < args.rows:
      b = next(loader)
      n, real = n + 1, real + int(b["attention_mask"].sum())
    dt = time.perf_counter() - t0
    fill = real / (n * args.batch * b["input_ids"].shape[1]) if packing else None
    name = "batch (packed, FFD)" if packing else "batch (buckets)"
    results.append((name + (f", fill {fill:.0%}" if fill else ""), loader.state()["cursor"] / dt,
                    dt))
  tokens = s["tokens"] / s["examples"]
  write_result(
      "data", f"Data pipeline, {args.rows} conversational rows (SFT, all_assistant masks)",
      f"python benchmarks/data.py --rows {args.rows} --batch {args.batch} "
      f"--max_length {args.max_length}",
      [["stage", "rows/s", "seconds"]] + [[n, f"{r:,.0f}", f"{dt:.2f}"] for n, r, dt in results],
      f"{tokens:.0f} tokens/row on average, SmolLM2 tokenizer + chat template, batch "
      f"{args.batch}, buckets {list(cfg.buckets)}; single process, no prefetch thread; CPU shared "
      f"with other jobs (load average {os.getloadavg()[0]:.1f}). "
      f"{versions('transformers', 'tokenizers', 'datasets')}.")

if __name__ == "__main__":
  main()
