"""Batch generation from a jsonl file (or one --prompt) to a jsonl file.

    python scripts/generate.py --prompts=prompts.jsonl --out=out.jsonl --max_new_tokens=128 \
        [--model=bundled:smollm2-135m-instruct] [--temperature=0.7 --top_p=0.9 --n=4 --seed=0]
    python scripts/generate.py --prompt "Write a haiku about JAX."

Input rows hold "prompt" (a string, rendered with the chat template when the tokenizer has one,
or a list of {"role", "content"} messages) or "messages"; other keys are copied to the output.
Each output row adds "completion", "finish_reason", "num_tokens", "sample" (0..n-1) and, with
--logprobs, the per-token "logprobs" of the raw model distribution.
"""

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

import jaxpost
from jaxpost.generate import generate


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="bundled:smollm2-135m-instruct")
  p.add_argument("--dtype", default="float32")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompts", help="jsonl file with a 'prompt' or 'messages' key per row")
  src.add_argument("--prompt", help="a single prompt string")
  p.add_argument("--out", help="output jsonl (default: print to stdout)")
  p.add_argument("--max_new_tokens", type=int, default=256)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--min_p", type=float, default=0.0)
  p.add_argument("--n", type=int, default=1, help="samples per prompt")
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch_size", type=int, default=32, help="prompts per generate call")
  p.add_argument("--no_chat_template", action="store_true", help="feed string prompts raw")
  p.add_argument("--logprobs", action="store_true", help="write per-token log-probs")
  return p.parse_args(argv)


def read_rows(path: str):
  rows = []
  with open(path) as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise SystemExit(f"{path}:{i + 1}: not valid JSON ({e})")
      if not isinstance(row, dict) or not ({"prompt", "messages"} & row.keys()):
        raise SystemExit(f"{path}:{i + 1}: each row needs a 'prompt' or 'messages' key")
      rows.append(row)
  if not rows:
    raise SystemExit(f"{path}: no rows")
  return rows


def main(argv=None):
  args = parse_args(argv)
  rows = read_rows(args.prompts) if args.prompts else [{"prompt": args.prompt}]
  lm = jaxpost.load_model(args.model, dtype=args.dtype)
  sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, n=args.n,
                  stop_strings=args.stop, chat_template=False if args.no_chat_template else None)
  out = open(args.out, "w") if args.out else sys.stdout
  bar = tqdm(total=len(rows), unit="prompt", disable=args.out is None)
  try:
    for start in range(0, len(rows), args.batch_size):
      chunk = rows[start:start + args.batch_size]
      prompts = [r.get("messages", r.get("prompt")) for r in chunk]
      try:
        res = generate(lm, prompts, seed=args.seed + start * args.n,
                       batch_size=args.batch_size * args.n, **sampling)
      except ValueError as e:
        raise SystemExit(f"{args.prompts or '--prompt'} (rows {start}..{start + len(chunk) - 1}):"
                         f" {e}")
      for i in range(len(res)):
        row = dict(chunk[res.prompt_index[i]], completion=res.texts[i],
                   finish_reason=res.finish_reasons[i], num_tokens=res.lengths[i],
                   sample=i % args.n)
        if args.logprobs:
          row["logprobs"] = [round(float(x), 5) for x in res.logprobs[i]]
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
      bar.update(len(chunk))
  finally:
    bar.close()
    if args.out:
      out.close()
      print(f"wrote {Path(args.out)}", file=sys.stderr)


if __name__ == "__main__":
  main()
