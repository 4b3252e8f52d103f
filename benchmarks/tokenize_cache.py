"""Tokenisation cache: the data part of a start, without cache, cold (tokenise + write) and warm.

    python benchmarks/tokenize_cache.py [--gsm8k ../shared/data/gsm8k_train.jsonl]

Tables: the built-in arithmetic task (3,000 rows) as SFT and as preference pairs, and GSM8K
train (7,473 rows, question -> prompt, answer -> completion) when the file exists. Each timing is
one `build_loader` call (read, normalise, tokenise or load, summary) with the bundled SmolLM2
tokenizer in a fresh cache folder (warm: median of 3); writes
benchmarks/results/tokenize_cache.md (BENCHMARKS.md via benchmarks/report.py).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import versions, write_result  # noqa: E402

from jaxpost.data import build_loader, data_defaults  # noqa: E402
from jaxpost.hf import load_tokenizer, resolve_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def tables(gsm8k: Path):
  """(name, kind, data config overrides) of each measured table."""
  out = [("builtin:arithmetic", "sft", {"train": "builtin:arithmetic", "max_length": 128}),
         ("builtin:arithmetic", "preference", {"train": "builtin:arithmetic",
                                               "max_length": 128})]
  if gsm8k.is_file():
    out.append((f"GSM8K train ({gsm8k.name})", "sft", {
        "train": str(gsm8k), "max_length": 512,
        "columns": {"prompt": "question", "completion": "answer"}}))
  return out


def build_seconds(kind: str, overrides: dict, cache_dir: str, cache: bool = True):
  cfg = data_defaults()
  cfg.update({**overrides, "cache_dir": cache_dir, "cache": cache, "prefetch": 0})
  tok = load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))
  start = time.perf_counter()
  loader = build_loader(cfg, tok, kind, 8, process_index=0, process_count=1)
  return time.perf_counter() - start, loader.summary


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--gsm8k", default=str(ROOT.parent / "shared/data/gsm8k_train.jsonl"))
  args = ap.parse_args()
  rows = [["table", "kind", "rows", "tokens", "no cache (s)", "cold: tokenise + write (s)",
           "warm: load (s, median of 3)", "warm speedup", "cache file"]]
  for name, kind, overrides in tables(Path(args.gsm8k)):
    with tempfile.TemporaryDirectory() as cache_dir:
      off, summary = build_seconds(kind, overrides, cache_dir, cache=False)
      cold, _ = build_seconds(kind, overrides, cache_dir)
      warms = [build_seconds(kind, overrides, cache_dir) for _ in range(3)]
      assert all(again == summary for _, again in warms), "the cached table differs"
      warm = statistics.median(seconds for seconds, _ in warms)
      size = sum(p.stat().st_size for p in Path(cache_dir).iterdir())
    rows.append([name, kind, f"{summary['rows_read']:,}", f"{summary['tokens']:,}", f"{off:.2f}",
                 f"{cold:.2f}", f"{warm:.2f}", f"{off / warm:.0f}x", f"{size / 2**20:.1f} MB"])
  write_result(
      "tokenize_cache", "Tokenisation cache: cold vs warm start of the data pipeline",
      f"python benchmarks/tokenize_cache.py --gsm8k {args.gsm8k}", rows,
      "One `build_loader` call each (read rows, normalise, tokenise with the bundled SmolLM2 "
      "tokenizer and chat template, or load the cached table; summary), single process. "
      "\"no cache\" is `data.cache=False`; \"cold\" tokenises and writes the cache (first run); "
      "\"warm\" is every later start on the same rows and settings (a resume, another recipe "
      "with the same data, tokenizer and limits). 2-core CPU shared with other jobs (load "
      f"average {os.getloadavg()[0]:.1f}). {versions('transformers', 'tokenizers', 'numpy')}.")


if __name__ == "__main__":
  main()
