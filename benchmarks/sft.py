"""SFT speed: jaxpost vs TRL SFTTrainer on SmolLM2-135M (fp32), same rows, batch and lengths.

    python benchmarks/sft.py [--steps=8] [--batch_size=8] [--length=64] [--trl_threads=1,2]

The parent process tokenises the built-in arithmetic task once with jaxpost's loader (one
length bucket, so every batch is [batch_size, length]) and runs each framework in its own child
process (so peak RSS is per framework):

  jaxpost  `jaxpost.train` on those batches, log_every=1 (step_time from metrics.jsonl)
  TRL      `SFTTrainer` on the same token ids and completion masks (pre-tokenised dataset,
           completion-only loss, padded to the same length), AdamW, same learning rate; once
           per torch thread count in --trl_threads (the best is the yardstick)

Reported: median step time over the steps after the first (jaxpost's first step is XLA
compilation; TRL's is eager warm-up), trained tokens/s = real (non-pad) tokens per step /
median step time, MFU = model FLOPs of the padded batch (6N + 12 L H d T per position) /
step time / peak (290 GFLOP/s for this host's CPU, `config.metrics.cpu_peak_flops`), peak RSS of
the child process, and the first-step (compile / warm-up) time. TRL is not a dependency: install
it with `pip install --no-deps trl` (it needs `accelerate`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import step_timer  # noqa: E402
MODEL = "bundled:smollm2-135m-instruct"
LEARNING_RATE = 5e-5


def jaxpost_config(args, workdir):
  from configs import sft
  c = sft.get_config()
  c.update_from_flattened_dict({
      "workdir": workdir, "max_steps": args.steps, "batch_size": args.batch_size,
      "log_every": 1, "eval_at_start": False, "data.eval": None, "data.max_length": args.length,
      "data.buckets": (args.length,), "checkpoint.every": -1, "metrics.tensorboard": False,
      "metrics.progress_bar": False, "optimizer.learning_rate": LEARNING_RATE,
      "optimizer.warmup_steps": 0, "report.task": ""})
  return c


def make_rows(args) -> list[dict]:
  """The token ids / completion masks of the batches jaxpost will train on, in order."""
  from jaxpost.data.loader import build_loader
  from jaxpost.hf import load_tokenizer, resolve_model_dir
  c = jaxpost_config(args, "")
  tokenizer = load_tokenizer(resolve_model_dir(MODEL))
  loader = build_loader(c.data, tokenizer, "sft", c.batch_size, seed=c.seed)
  rows = []
  for _ in range(args.steps):
    batch = next(loader)
    for ids, mask, loss_mask in zip(batch["input_ids"], batch["attention_mask"],
                                    batch["loss_mask"]):
      n = int(mask.sum())
      rows.append({"input_ids": ids[:n].tolist(), "completion_mask": loss_mask[:n].tolist()})
  loader.close()
  return rows


def run_jaxpost(args, rows):
  import jaxpost
  with tempfile.TemporaryDirectory() as workdir:
    jaxpost.train(jaxpost_config(args, workdir))
    records = [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]
  return [r["step_time"] for r in records[1:]], records[0]["compile_time"]


def run_trl(args, rows):
  import datasets
  import torch
  import transformers
  from trl import SFTConfig, SFTTrainer
  from jaxpost.hf import resolve_model_dir
  torch.set_num_threads(args.threads)
  model_dir = str(resolve_model_dir(MODEL))
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  times = []


  with tempfile.TemporaryDirectory() as out:
    config = SFTConfig(
        output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, max_length=args.length,
        pad_to_multiple_of=args.length, completion_only_loss=True, dataloader_drop_last=True,
        seed=0)
    trainer = SFTTrainer(model=model, args=config, callbacks=[step_timer(times)],
                         train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=transformers.AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
  return times[1:], times[0]


def child(framework: str, args, rows_file: str):
  rows = json.loads(Path(rows_file).read_text())
  step_times, first = (run_jaxpost if framework == "jaxpost" else run_trl)(args, rows)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
  print("RESULT " + json.dumps({"step_times": step_times, "first_step": first, "rss_mb": rss}))


def summarise(name, result, rows, args, flops_per_step, peak):
  median = statistics.median(result["step_times"])
  tokens = sum(len(r["input_ids"]) for r in rows) / args.steps
  return {"framework": name, "median_step_s": median, "tokens_per_s": tokens / median,
          "mfu": flops_per_step / median / peak, "peak_rss_mb": result["rss_mb"],
          "first_step_s": result["first_step"], "timed_steps": len(result["step_times"])}


def table(results) -> str:
  lines = ["| framework | median step (s) | tokens/s | MFU | peak RSS (MiB) | "
           "compile / first step (s) | timed steps |", "|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r['framework']} | {r['median_step_s']:.3f} | {r['tokens_per_s']:.1f} | "
                 f"{100 * r['mfu']:.1f}% | {r['peak_rss_mb']:.0f} | {r['first_step_s']:.1f} | "
                 f"{r['timed_steps']} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--trl_threads", default=f"1,{os.cpu_count()}",
                      help="torch thread counts to run TRL with (each is a row)")
  parser.add_argument("--child", choices=["jaxpost", "trl"])
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--rows")
  args = parser.parse_args()
  if args.child:
    return child(args.child, args, args.rows)

  import jax
  from jaxpost.hf import read_hf_config, resolve_model_dir
  from jaxpost.models.config import LlamaConfig
  from jaxpost.train.metrics import train_flops
  import numpy as np
  rows = make_rows(args)
  cfg = LlamaConfig.from_hf(read_hf_config(resolve_model_dir(MODEL)))
  flops = train_flops(cfg, {"input_ids": np.zeros((args.batch_size, args.length))})
  peak = 290e9
  results = []
  load_before = os.getloadavg()
  with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
    json.dump(rows, f)
    f.flush()
    runs = [("jaxpost", "jaxpost", os.cpu_count())] + [
        ("trl", f"TRL ({t} torch thread{'s' * (t != '1')})", t)
        for t in args.trl_threads.split(",")]
    for child_name, label, threads in runs:
      cmd = [sys.executable, __file__, f"--child={child_name}", f"--rows={f.name}",
             f"--steps={args.steps}", f"--batch_size={args.batch_size}",
             f"--length={args.length}", f"--threads={threads}"]
      proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
      out = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if proc.returncode or not out:
        raise RuntimeError(f"{label} run failed:\n{proc.stderr[-4000:]}")
      results.append(summarise(label, json.loads(out[0][7:]), rows, args, flops, peak))
  import trl
  import torch
  import transformers
  speedup = results[0]["tokens_per_s"] / max(r["tokens_per_s"] for r in results[1:])
  report = "\n".join([
      "# SFT: jaxpost vs TRL SFTTrainer", "",
      f"SmolLM2-135M-Instruct fp32, built-in arithmetic task, batch {args.batch_size} x "
      f"{args.length} tokens (same token ids and masks for both), AdamW lr {LEARNING_RATE}, "
      f"{args.steps} steps, median over steps 2..{args.steps}.", "",
      table(results), "",
      f"jaxpost / best TRL tokens/s: **{speedup:.2f}x**", "",
      "Both are matmul-bound fp32 on the CPU. torch's OpenMP threads slow down sharply when "
      "other processes share the cores (hence the 1-thread row); XLA's thread pool much less.",
      ""
      f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
      f"load average {load_before[0]:.1f} before the run (shared machine). Versions: jax "
      f"{jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"trl {trl.__version__}. MFU peak: {peak / 1e9:.0f} GFLOP/s (2048^2 fp32 matmul).", "",
      f"Command: `python benchmarks/sft.py --steps={args.steps} --batch_size={args.batch_size} "
      f"--length={args.length} --trl_threads={args.trl_threads}`", ""])
  out_dir = ROOT / "benchmarks" / "results"
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "sft.md").write_text(report)
  print(report)


if __name__ == "__main__":
  main()
