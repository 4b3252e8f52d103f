"""DPO speed: jaxpost vs TRL DPOTrainer on SmolLM2-135M (fp32), same preference batches.

    python benchmarks/dpo.py [--steps=4] [--batch_size=4] [--lengths=128,512] [--trl_threads=1,2]

DPO (Rafailov et al. 2023, arXiv:2305.18290), sigmoid loss, beta 0.1, full fine-tune, reference =
the initial policy, AdamW lr 5e-6 (configs/dpo.py), no warm-up. For each max length T the parent
builds `--steps` batches of B pairs once with jaxpost's loader (one length bucket, so every batch
is [B, T] per side) from the built-in arithmetic task, each prompt lengthened with solved examples
(earlier user/assistant turns) until the longer side of its pair would pass T, so the real tokens
scale with T. Each framework then runs in its own child process (peak RSS is per framework):

  jaxpost  `jaxpost.train` with configs/dpo.py on those batches, log_every=1 (metrics.jsonl)
  TRL      `DPOTrainer` on the same prompt / chosen / rejected token ids (the loader's
           prompt+completion split, which is TRL's), padded to T, sequential order; once per
           torch thread count in --trl_threads (the best is the yardstick)

Reported: median step time over steps 2..steps (jaxpost's step 1 is XLA compilation, TRL's eager
warm-up), tokens/s = real (non-pad) chosen+rejected tokens per step / median step time, MFU =
model FLOPs of the padded step / step time / 290 GFLOP/s (common.CPU_PEAK_FLOPS), where DPO costs
3 forwards of the policy (forward + backward) and 1 of the reference over the 2B rows:
4 * forward_flops_per_token(T) * 2B * T; peak RSS of the child; step-1 loss (log 2 for both, a
check that the work is the same). TRL is not a dependency: `pip install --no-deps trl accelerate`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import CPU_PEAK_FLOPS, peak_rss_gb, step_timer, versions, write_result  # noqa: E402

MODEL = "bundled:smollm2-135m-instruct"
LEARNING_RATE = 5e-6
BETA = 0.1


def filled_rows(ct, length: int, count: int) -> list[dict]:
  """`count` arithmetic preference rows, each prompt preceded by solved examples (user question,
  assistant's concise right answer) for as long as prompt + longer completion stays <= length."""
  from jaxpost.data.tasks import task_rows
  rows = task_rows("arithmetic", "train", "preference")
  shots, out = rows[count:], []
  for row in rows[:count]:
    history = []
    for shot in shots:
      longer = history + shot["prompt"] + shot["chosen"]
      prompt, comps = ct.completions(longer + row["prompt"], [row["chosen"], row["rejected"]])
      if len(prompt) + max(map(len, comps)) > length:
        break
      history = longer
    out.append({**row, "prompt": history + row["prompt"]})
  return out


def make_batches(args, length: int) -> dict:
  """The jaxpost loader's `args.steps` batches, stacked: {field: [steps, B, ...]}."""
  from jaxpost.data.chat import ChatTokenizer
  from jaxpost.data.config import data_defaults
  from jaxpost.data.loader import build_loader
  from jaxpost.hf import load_tokenizer, resolve_model_dir
  tokenizer = load_tokenizer(resolve_model_dir(MODEL))
  data = data_defaults()
  data.update({"max_length": length, "buckets": (length,), "shuffle": False, "prefetch": 0})
  data.train = filled_rows(ChatTokenizer(tokenizer), length, args.steps * args.batch_size)
  loader = build_loader(data, tokenizer, "preference", args.batch_size)
  if loader.summary["truncated"] or loader.summary["dropped"]:
    raise RuntimeError(f"benchmark rows must fit {length} tokens: {loader.summary}")
  batches = [next(loader) for _ in range(args.steps)]
  loader.close()
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def trl_rows(batches: dict) -> list[dict]:
  """TRL's tokenised pair format from the jaxpost batches: the prompt is what precedes the first
  trainable token (shared by both sides), each completion the rest of its real tokens."""
  flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in batches.items()}
  rows = []
  for i in range(len(flat["chosen_input_ids"])):
    sides = {}
    for side in ("chosen", "rejected"):
      ids = flat[f"{side}_input_ids"][i][: flat[f"{side}_attention_mask"][i].sum()].tolist()
      start = int(np.argmax(flat[f"{side}_loss_mask"][i]))
      sides[side] = (ids[:start], ids[start:])
    if sides["chosen"][0] != sides["rejected"][0]:
      raise RuntimeError(f"pair {i}: chosen and rejected prompts differ")
    rows.append({"prompt_ids": sides["chosen"][0], "chosen_ids": sides["chosen"][1],
                 "rejected_ids": sides["rejected"][1]})
  return rows


def jaxpost_config(args, workdir: str):
  from configs import dpo
  c = dpo.get_config()
  c.update_from_flattened_dict({
      "workdir": workdir, "max_steps": args.steps, "batch_size": args.batch_size, "beta": BETA,
      "log_every": 1, "eval_at_start": False, "data.eval": None, "report.task": "",
      "export_hf": "", "data.max_length": args.length, "data.buckets": (args.length,),
      "checkpoint.every": -1, "metrics.tensorboard": False, "metrics.progress_bar": False,
      "optimizer.learning_rate": LEARNING_RATE, "optimizer.warmup_steps": 0})
  return c


def run_jaxpost(args, batches):
  import jaxpost
  steps = [{k: v[i] for k, v in batches.items()} for i in range(args.steps)]
  with tempfile.TemporaryDirectory() as workdir:
    jaxpost.train(jaxpost_config(args, workdir), train_loader=iter(steps))
    records = [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]
  return [r["step_time"] for r in records[1:]], records[0]["compile_time"], records[0]["loss"]


def run_trl(args, batches):
  import datasets
  import torch
  import transformers
  from trl import DPOConfig, DPOTrainer
  from jaxpost.hf import resolve_model_dir
  torch.set_num_threads(args.threads)
  model_dir = str(resolve_model_dir(MODEL))
  times = []


  class PreTokenized(DPOTrainer):
    """Takes rows already split into prompt_ids / chosen_ids / rejected_ids as they are."""

    def _prepare_dataset(self, dataset, *_, **__):
      return dataset

  with tempfile.TemporaryDirectory() as out:
    config = DPOConfig(
        output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, beta=BETA, loss_type=["sigmoid"],
        max_length=args.length, pad_to_multiple_of=args.length, dataloader_drop_last=True,
        train_sampling_strategy="sequential", seed=0)
    trainer = PreTokenized(
        model=transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=config, callbacks=[step_timer(times)], train_dataset=datasets.Dataset.from_list(
            trl_rows(batches)),
        processing_class=transformers.AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
  losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
  return times[1:], times[0], losses[0]


def child(framework: str, args):
  batches = dict(np.load(args.batches))
  step_times, first, loss = (run_jaxpost if framework == "jaxpost" else run_trl)(args, batches)
  print("RESULT " + json.dumps({"step_times": step_times, "first_step": first, "loss": loss,
                                "rss_gb": peak_rss_gb()}))


def run_child(child_name: str, threads: int, args, length: int, batches_file: str) -> dict:
  cmd = [sys.executable, __file__, f"--child={child_name}", f"--batches={batches_file}",
         f"--steps={args.steps}", f"--batch_size={args.batch_size}", f"--length={length}",
         f"--threads={threads}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  out = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  if proc.returncode or not out:
    raise RuntimeError(f"{child_name} run (T={length}) failed:\n{proc.stderr[-4000:]}")
  return json.loads(out[0][len("RESULT "):])


def dpo_step_flops(cfg, batch_size: int, length: int) -> float:
  """Model FLOPs of one DPO step on [2B, T]: policy forward + backward (3x) + reference (1x)."""
  from jaxpost.models.config import forward_flops_per_token
  return 4 * forward_flops_per_token(cfg, length) * 2 * batch_size * length


def table_row(label, length, result, tokens, flops) -> list:
  median = statistics.median(result["step_times"])
  return [label, length, f"{median:.2f}", f"{tokens / median:.1f}",
          f"{100 * flops / median / CPU_PEAK_FLOPS:.1f}%", f"{result['rss_gb']:.2f}",
          f"{result['first_step']:.1f}", f"{result['loss']:.4f}", len(result["step_times"])]


def bench_length(args, length: int, cfg) -> tuple[list[list], float]:
  """Table rows for one max length and jaxpost's tokens/s over the best TRL row's."""
  batches = make_batches(args, length)
  tokens = float(batches["chosen_attention_mask"].sum() + batches["rejected_attention_mask"].sum())
  tokens /= args.steps
  flops = dpo_step_flops(cfg, args.batch_size, length)
  runs = [("jaxpost", "jaxpost", os.cpu_count())] + [
      ("trl", f"TRL ({t} torch thread{'s' * (t != 1)})", t) for t in args.trl_threads]
  rows, speeds = [], []
  with tempfile.NamedTemporaryFile(suffix=".npz") as f:
    np.savez(f.name, **batches)
    for child_name, label, threads in runs:
      result = run_child(child_name, threads, args, length, f.name)
      rows.append(table_row(label, length, result, tokens, flops))
      speeds.append(tokens / statistics.median(result["step_times"]))
  return rows, speeds[0] / max(speeds[1:])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--lengths", default="128,512")
  parser.add_argument("--trl_threads", default=f"1,{os.cpu_count()}",
                      help="torch thread counts to run TRL with (each is a row)")
  parser.add_argument("--child", choices=["jaxpost", "trl"])
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--length", type=int)
  parser.add_argument("--batches")
  args = parser.parse_args()
  if args.child:
    return child(args.child, args)
  args.trl_threads = [int(t) for t in args.trl_threads.split(",")]

  from jaxpost.hf import read_hf_config, resolve_model_dir
  from jaxpost.models.config import LlamaConfig
  cfg = LlamaConfig.from_hf(read_hf_config(resolve_model_dir(MODEL)))
  load_before = os.getloadavg()[0]
  table = [["framework", "max length", "median step (s)", "tokens/s", "MFU", "peak RSS (GB)",
            "compile / first step (s)", "step-1 loss", "timed steps"]]
  speedups = []
  for length in map(int, args.lengths.split(",")):
    rows, speedup = bench_length(args, length, cfg)
    table += rows
    speedups.append(f"T={length}: **{speedup:.2f}x**")
  threads = ",".join(map(str, args.trl_threads))
  write_result(
      "dpo", f"DPO: jaxpost vs TRL DPOTrainer, SmolLM2-135M fp32, B={args.batch_size} pairs",
      f"python benchmarks/dpo.py --steps={args.steps} --batch_size={args.batch_size} "
      f"--lengths={args.lengths} --trl_threads={threads}", table,
      f"jaxpost / best TRL tokens/s: {', '.join(speedups)}. Sigmoid DPO, beta {BETA}, full "
      f"fine-tune, reference = initial policy, AdamW lr {LEARNING_RATE}; built-in arithmetic "
      "pairs with solved examples prepended to fill each max length, the same token ids and "
      f"[{args.batch_size}, T] padding for both; median over steps 2..{args.steps}. tokens/s "
      "counts real chosen+rejected tokens; MFU counts the padded step as 3 policy forwards + "
      f"1 reference forward. 1-minute load average {load_before:.2f} before the run, "
      f"{os.getloadavg()[0]:.2f} after (2-core machine, shared). "
      f"{versions('jax', 'torch', 'transformers', 'trl')}.")


if __name__ == "__main__":
  main()
