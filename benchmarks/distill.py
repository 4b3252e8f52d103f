"""GKD speed: one jaxpost GKD step vs TRL 1.16's experimental GKDTrainer, SmolLM2-135M fp32.

    PYTHONPATH=/tmp/trl_site python benchmarks/distill.py [--steps=3] [--batch=8]
        [--length=96] [--new_tokens=16] [--torch_threads=N]

Generalised knowledge distillation (Agarwal et al. 2024, arXiv:2306.13649): the teacher is the
bundled SmolLM2-135M-Instruct (frozen), the student its every other layer (15 of 30,
`jaxpost.models.student.build_student`, written once as an HF dir that both sides load). One
step = with probability λ (`distill.lmbda` / TRL `lmbda`) replace each row's completion by the
student's own sample (temperature 0.9, up to `--new_tokens`, stop at EOS), then one AdamW step
on the generalised JSD (β 0.5, τ 1) between the two models' next-token distributions on the
completion tokens: a student forward + backward and a teacher forward. The coin makes a run's
steps differ, so each side runs twice, with λ = 0 (always the data's completions: a fixed
[B, T] shape, MFU given) and λ = 1 (always on-policy: sampling + the step on the sampled rows).
Rows: the first B-row batches of jaxpost's SFT loader over the built-in arithmetic task
(shuffle off, one bucket T = `--length`), handed to TRL as the same tensors (its collator
asserts nothing is re-tokenised: it builds labels / prompts from jaxpost's masks).

  jaxpost  `jaxpost.configs.get("distill:gkd")` through `jaxpost.train` on those batches
           (benchmarks/trainers.py), step_time and time/rollout from metrics.jsonl
  TRL      trl.experimental.gkd.GKDTrainer, per_device_train_batch_size B, one step per
           batch (sequential), step time from on_step_begin to on_step_end

MFU (λ = 0) = (3 F_student + F_teacher) · B · T / step time / peak: the teacher's forward FLOPs
are counted (F = `forward_flops_per_token` at T). Each side runs in its own child process
(peak RSS per framework); writes benchmarks/results/distill.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import common  # noqa: E402
import trainers  # noqa: E402

TEACHER = trainers.MODEL
LEARNING_RATE = 1e-4  # the recipe's
BETA, TEMPERATURE = 0.5, 0.9  # GKD's JSD β and sampling temperature (TRL's and the recipe's)
LMBDAS = (0.0, 1.0)


# ------------------------------------------------------------------------------ jaxpost

def run_jaxpost(spec: dict, batches: dict) -> dict:
  config = trainers.jaxpost_config("gkd", "", spec["steps"], spec["batch_size"], spec["length"],
                                   LEARNING_RATE, {
      "model.name_or_path": spec["student_dir"], "student.init": "",
      "teacher.name_or_path": TEACHER, "distill.lmbda": spec["lmbda"], "distill.beta": BETA,
      "distill.temperature": 1.0, "rollout.temperature": TEMPERATURE,
      "rollout.max_new_tokens": spec["new_tokens"], "model.dtype": "float32",
      "model.param_dtype": "float32", "optimizer.weight_decay": 0.0,
      "optimizer.max_grad_norm": 1.0, "optimizer.schedule": "cosine"})
  records = trainers.train_records(config, batches)
  timed = records[1:]
  return {"step_times": [r["step_time"] for r in timed],
          "rollout_times": [r.get("time/rollout", 0.0) for r in timed],
          "first_step": records[0]["compile_time"], "loss": records[0]["loss"],
          "on_policy": [r["gkd/on_policy"] for r in records]}


# ------------------------------------------------------------------------------ TRL

def collator(batches: dict, seen: list, pad_id: int):
  """TRL's batch of dataset rows {"row": i} (row i of the flattened jaxpost batches): input ids,
  attention mask, labels (-100 off the loss mask) and the left-padded prompts (each row's tokens
  before its first trainable one) that GKD samples from; appends the rows' indices to `seen`."""
  import torch
  flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in batches.items()}

  def collate(examples):
    rows = [e["row"] for e in examples]
    seen.append(rows)
    ids, mask, loss = (flat[k][rows] for k in ("input_ids", "attention_mask", "loss_mask"))
    starts = loss.argmax(axis=1)
    width = int(starts.max())
    prompts = np.full((len(rows), width), pad_id, np.int64)
    prompt_mask = np.zeros((len(rows), width), np.int64)
    for r, start in enumerate(starts):
      prompts[r, width - start:], prompt_mask[r, width - start:] = ids[r, :start], 1
    tensor = lambda x: torch.tensor(np.asarray(x, np.int64))
    return {"input_ids": tensor(ids), "attention_mask": tensor(mask),
            "labels": tensor(np.where(loss > 0, ids, -100)), "prompts": tensor(prompts),
            "prompt_attention_mask": tensor(prompt_mask)}

  return collate


def run_trl(spec: dict, batches: dict) -> dict:
  import datasets
  import torch
  import transformers
  from trl.experimental.gkd import GKDConfig, GKDTrainer
  torch.set_num_threads(spec["threads"])
  times, seen = [], []
  rows = batches["input_ids"].shape[0] * spec["batch_size"]
  lm = lambda path: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(spec["student_dir"])
  with tempfile.TemporaryDirectory() as out:
    args = GKDConfig(
        output_dir=out, per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
        lmbda=spec["lmbda"], beta=BETA, temperature=TEMPERATURE,
        max_new_tokens=spec["new_tokens"], seq_kd=False, learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        max_length=spec["length"], dataloader_drop_last=True,
        train_sampling_strategy="sequential", seed=0)
    trainer = GKDTrainer(
        model=lm(spec["student_dir"]), teacher_model=lm(str(resolve(TEACHER))), args=args,
        data_collator=collator(batches, seen, tokenizer.pad_token_id),
        train_dataset=datasets.Dataset.from_list([{"row": i} for i in range(rows)]),
        processing_class=tokenizer,
        callbacks=[common.step_timer(times)])
    trainer.train()
  want = [list(range(s * spec["batch_size"], (s + 1) * spec["batch_size"]))
          for s in range(spec["steps"])]
  if seen[:spec["steps"]] != want:
    raise RuntimeError(f"TRL's batches took rows {seen}, expected {want} (in order)")
  losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
  return {"step_times": times[1:], "first_step": times[0], "loss": losses[0]}


def resolve(name: str):
  from jaxpost.hf import resolve_model_dir
  return resolve_model_dir(name)


# ------------------------------------------------------------------------------ parent

def child(spec_file: str):
  spec = json.loads(Path(spec_file).read_text())
  batches = dict(np.load(spec["batches"]))
  result = run_jaxpost(spec, batches) if spec["impl"] == "jaxpost" else run_trl(spec, batches)
  common.emit_result({**result, "rss_gb": common.peak_rss_gb()})


def run_side(spec: dict, tmp: Path) -> dict:
  label = f"gkd {spec['impl']} (lmbda {spec['lmbda']:g})"
  path = tmp / f"gkd_{spec['impl']}_{spec['lmbda']:g}.json"
  path.write_text(json.dumps(spec))
  print(f"{label} ...", flush=True)
  result = common.child_result([sys.executable, __file__, f"--child={path}"], label, ROOT)
  print(f"{label}: median {statistics.median(result['step_times']):.2f} s, first "
        f"{result['first_step']:.1f} s, step-1 loss {result['loss']:.4f}", flush=True)
  return result


def step_flops(spec: dict) -> float:
  """(3 F_student + F_teacher) · B · T of one off-policy step (module docstring)."""
  from jaxpost.algos.iteration import rows_forward_flops
  from jaxpost.hf import read_hf_config
  from jaxpost.models.config import LlamaConfig
  cfg = lambda path: LlamaConfig.from_hf(read_hf_config(path))
  B, T = spec["batch_size"], spec["length"]
  return (common.train_step_flops(cfg(spec["student_dir"]), B, T)
          + rows_forward_flops(cfg(resolve(TEACHER)), T, B))


HEADER = ["λ (on-policy share)", "framework", "B x T, new tokens", "step (s)",
          "of which sampling (s)", "jaxpost / TRL", "MFU", "peak RSS (GB)",
          "compile / first step (s)", "step-1 loss"]


def table_rows(spec: dict, lmbda: float, ours: dict, ref: dict, flops: float) -> list[list]:
  ratio = statistics.median(ref["step_times"]) / statistics.median(ours["step_times"])
  rows = []
  for label, r, speed in (("jaxpost", ours, f"**{ratio:.2f}x**"),
                          ("TRL GKDTrainer", ref, "1.00x")):
    median = statistics.median(r["step_times"])
    sampling = (f"{statistics.median(r['rollout_times']):.2f}" if "rollout_times" in r
                else "-")
    mfu = f"{100 * flops / median / common.CPU_PEAK_FLOPS:.1f}%" if lmbda == 0 else "-"
    rows.append([f"{lmbda:g}", label, f"{spec['batch_size']} x {spec['length']}, "
                 f"{spec['new_tokens']}", f"{median:.2f}", sampling, speed, mfu,
                 f"{r['rss_gb']:.2f}", f"{r['first_step']:.1f}", f"{r['loss']:.4f}"])
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=96)
  parser.add_argument("--new_tokens", type=int, default=16)
  parser.add_argument("--torch_threads", type=int, default=os.cpu_count())
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args.child)
  from jaxpost.models.student import build_student
  load = os.getloadavg()[0]
  steps = args.steps + 1
  table = [HEADER]
  with tempfile.TemporaryDirectory() as tmp:
    batches = Path(tmp) / "batches.npz"
    np.savez(batches, **trainers.sft_batches(args.length, args.batch, steps))
    spec = {"steps": steps, "batch_size": args.batch, "length": args.length,
            "new_tokens": args.new_tokens, "threads": args.torch_threads,
            "batches": str(batches), "student_dir": str(build_student(
                TEACHER, "teacher_layers:every_other", Path(tmp) / "student"))}
    flops = step_flops(spec)
    on_policy = {}
    for lmbda in LMBDAS:
      ours, ref = (run_side({**spec, "lmbda": lmbda, "impl": impl}, Path(tmp))
                   for impl in ("jaxpost", "trl"))
      on_policy[lmbda] = ours["on_policy"]
      table += table_rows(spec, lmbda, ours, ref, flops)
  common.write_result(
      "distill", "GKD: one step, jaxpost vs TRL GKDTrainer, SmolLM2-135M teacher -> 15-layer "
      "student, fp32",
      f"PYTHONPATH=/tmp/trl_site python benchmarks/distill.py --steps={args.steps} "
      f"--batch={args.batch} --length={args.length} --new_tokens={args.new_tokens} "
      f"--torch_threads={args.torch_threads}", table,
      notes(args, flops, on_policy, load))


def notes(args, flops: float, on_policy: dict, load: float) -> str:
  return " ".join([
      "Target: jaxpost >= 2x TRL's step. Teacher SmolLM2-135M-Instruct (30 layers, frozen),",
      "student its layers 0, 2, ..., 28 (the same HF dir on both sides), fp32 weights and",
      f"compute. {args.batch} rows x {args.length} tokens of the built-in arithmetic SFT rows",
      "(jaxpost's loader, one bucket; TRL gets the same tensors in the same order, asserted),",
      f"generalised JSD β {BETA}, τ 1 on the completion tokens, AdamW lr {LEARNING_RATE:g},",
      "cosine, no warm-up, clipping at norm 1. λ = 0: the data's completions (no sampling);",
      f"λ = 1: every step samples each row's completion from the student (temperature",
      f"{TEMPERATURE}, up to {args.new_tokens} new tokens, stop at EOS) and trains on the",
      "sampled rows (jaxpost's on-policy flags per step:",
      f"{', '.join(f'λ {k:g}: {v}' for k, v in on_policy.items())}). The step-1 loss is",
      "each side's own JSD (TRL: a sum over the vocabulary and a mean over tokens, jaxpost: the",
      "same per token; equal at λ = 0 means the same forward). Sampling column: jaxpost's",
      "time/rollout (TRL's generate sits inside its training_step and is not split out).",
      f"MFU at λ = 0: {flops / 1e9:.0f} GFLOP per step (student 3F + teacher F at T =",
      f"{args.length}, padded) over the step time and this CPU's {common.CPU_PEAK_FLOPS / 1e9:.0f}",
      "GFLOP/s; none at λ = 1 (sampled lengths). Median of",
      f"{args.steps} timed steps after the first (jaxpost: XLA compilation; TRL: eager",
      f"warm-up). TRL ran with torch.set_num_threads({args.torch_threads}); XLA uses its default",
      "thread pool. Peak RSS is each child process's maximum resident set. The machine is",
      f"shared (2 cores): 1-minute load average {load:.2f} before, {os.getloadavg()[0]:.2f}",
      "after.", common.versions("jax", "flax", "optax", "torch", "transformers", "trl",
                                "accelerate") + "."])


if __name__ == "__main__":
  main()
