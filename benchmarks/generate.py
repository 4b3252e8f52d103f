"""Generation speed: jaxpost `generate` vs transformers `generate` (torch), same machine, same run.

    python benchmarks/generate.py [--batch_sizes=1,8,32] [--prompt_len=64] [--new_tokens=128]

Both load the same converted HF directory (bundled SmolLM2-135M-Instruct, fp32), decode greedily
from identical 64-token prompts and ignore EOS so every row makes exactly `new_tokens` tokens.
Reported: new tokens/s (median of `--repeats` timed calls after a warm-up call), time to first
token (a 1-token call: prefill + first token), and jaxpost's compile time (first call minus a
warm call). HF uses 1 or 2 torch threads, whichever a short probe finds faster (2 OpenMP
threads crawl when other processes share the cores).
Writes a markdown table to benchmarks/results/generate.md. `bench_jaxpost` / `bench_hf` are
also the generation rows of benchmarks/run.py (each in its own process there; this module
imports jax and torch only inside them).
"""

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

MODEL = "bundled:smollm2-135m-instruct"
OUT = Path(__file__).parent / "results" / "generate.md"


def make_prompts(tokenizer, batch, length):
  """`batch` distinct chat prompts cut/extended to exactly `length` tokens."""
  base = tokenizer.apply_chat_template(
      [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}],
      tokenize=False, add_generation_prompt=True)
  ids = tokenizer.encode(base, add_special_tokens=False)
  filler = tokenizer.encode(" The quick brown fox jumps over the lazy dog." * 20)
  return [(filler[b:b + length - len(ids)] + ids)[-length:] for b in range(batch)]


def timed(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _measure(run, batch, new_tokens, repeats, ttft):
  """First call (s), median call (s), new tokens/s, the first call's tokens and optional TTFT
  of `run(k)` (k new tokens per row -> the rows' token lists)."""
  start = time.perf_counter()
  tokens = run(new_tokens)
  first = time.perf_counter() - start
  seconds = timed(lambda: run(new_tokens), repeats)
  out = dict(first=first, seconds=seconds, tps=batch * new_tokens / seconds, tokens=tokens)
  if ttft:
    run(1)  # the 1-token shape is its own compile (jaxpost) / warm-up (HF)
    out["ttft"] = timed(lambda: run(1), repeats)
  return out


def bench_jaxpost(lm, prompts, new_tokens, repeats, ttft=True):
  from jaxpost.generate import generate

  def run(k):
    out = generate(lm, prompts, max_new_tokens=k, ignore_eos=True, batch_size=len(prompts))
    assert all(n == k for n in out.lengths), out.lengths
    return out.tokens
  out = _measure(run, len(prompts), new_tokens, repeats, ttft)
  out["compile"] = out["first"] - out["seconds"]
  return out


def bench_hf(model, prompts, new_tokens, repeats, threads=None, ttft=True):
  """HF greedy generate; `threads=None` probes 1 and 2 torch threads and keeps the faster."""
  import torch
  ids = torch.tensor(prompts, dtype=torch.long)
  mask = torch.ones_like(ids)

  def run(k):
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k,
                           min_new_tokens=k, do_sample=False, pad_token_id=2)
    assert out.shape[1] == ids.shape[1] + k
    return out[:, ids.shape[1]:].tolist()

  def per_call(th, k):
    torch.set_num_threads(th)
    return timed(lambda: run(k), 1)
  if threads is None:
    run(8)
    threads = min((1, 2), key=lambda th: per_call(th, 8))
  torch.set_num_threads(threads)
  return dict(_measure(run, len(prompts), new_tokens, repeats, ttft), threads=threads)


def load_hf(model_dir):
  import torch
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(model_dir), dtype=torch.float32).eval()


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch_sizes", default="1,8,32")
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  import jax
  import torch
  import transformers
  import jaxpost
  from jaxpost.hf import resolve_model_dir
  lm = jaxpost.load_model(MODEL)
  hf = load_hf(resolve_model_dir(MODEL))
  rows = []
  for b in [int(x) for x in args.batch_sizes.split(",")]:
    prompts = make_prompts(lm.tokenizer, b, args.prompt_len)
    j = bench_jaxpost(lm, prompts, args.new_tokens, args.repeats)
    h = bench_hf(hf, prompts, args.new_tokens, args.repeats)
    rows.append((b, j, h))
    print(f"batch {b}: jaxpost {j['tps']:.1f} tok/s, HF {h['tps']:.1f} tok/s", flush=True)
  load = os.getloadavg()
  lines = [
      "## Generation (greedy, SmolLM2-135M-Instruct fp32, CPU)",
      "",
      f"`python benchmarks/generate.py` — prompt {args.prompt_len} tokens, {args.new_tokens} new "
      f"tokens (EOS ignored), median of {args.repeats}. "
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
      f"{load[0]:.1f} at the end; jax {jax.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}.",
      "",
      "| batch | jaxpost new tok/s | HF new tok/s (torch threads) | speed-up | jaxpost TTFT (s) "
      "| HF TTFT (s) | jaxpost compile (s) |",
      "|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for b, j, h in rows:
    lines.append(f"| {b} | {j['tps']:.1f} | {h['tps']:.1f} ({h['threads']}) | "
                 f"{j['tps'] / h['tps']:.2f}x | "
                 f"{j['ttft']:.3f} | {h['ttft']:.3f} | {j['compile']:.1f} |")
  table = "\n".join(lines) + "\n"
  print(table)
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text(table)


if __name__ == "__main__":
  main()
