"""The side-by-side benchmark suite: jaxpost vs TRL / transformers in one run, one command.

    python benchmarks/run.py [--only=sft,rm,dpo,dpo_lora,sft_lora,generate,grpo] [--steps=4]
                             [--torch_threads=N] [--quick] [--set=model.scan_layers=False ...]

For every task the parent builds the inputs once (jaxpost's loader, one length bucket) and runs
jaxpost and the reference, each in its own child process (so peak RSS is per framework), on
the same bundled SmolLM2-135M-Instruct weights in fp32, the same token ids, batch and lengths:

  sft       configs/sft.py               vs TRL SFTTrainer (completion-only loss)
  rm        configs/rm.py (score head)   vs TRL RewardTrainer (same initial score head)
  dpo       configs/dpo.py, sigmoid      vs TRL DPOTrainer
  dpo_lora  dpo + LoRA r16 a32, 7 projs  vs DPOTrainer + peft LoraConfig (reference: adapters off)
  sft_lora  sft + LoRA r16 a32, 7 projs  vs SFTTrainer + peft LoraConfig
  sft_chat, rm_chat, dpo_chat, dpo_lora_chat
            the same on completion-heavy chat rows (a ~30-token prompt, completions of ~45 /
            ~35 tokens: trainers.chat_rows), each side padding as it does by default (jaxpost:
            its default length buckets; TRL: each batch to its longest row)
  generate  jaxpost.generate (greedy)    vs transformers generate
  grpo      configs/grpo.py, one GRPO    vs TRL GRPOTrainer (transformers generate);
            iteration (rollout + update)    benchmarks/grpo.py has the details

Each TRL child asserts that its collated batches carry exactly jaxpost's token ids, attention
masks and loss masks (benchmarks/trainers.py); the GRPO child, its prompt ids (benchmarks/
grpo.py). A training step count of `--steps` is timed after one compilation / warm-up step and
the median reported; generation times `--steps` calls after a first one. `--quick` runs tiny
shapes and 2 timed steps (a smoke test). `--set` overrides a key of jaxpost's training configs (a
lever of README "Memory and speed levers"); the recipe defaults are what the table reports. A
full run without `--set` writes benchmarks/results/suite.md and rebuilds BENCHMARKS.md
(benchmarks/report.py); a subset, --quick or --set run only prints its table unless given --write
(a subset then writes results/suite_<tasks>.md, its own section).
"""

from __future__ import annotations

import argparse
import dataclasses
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
import grpo  # noqa: E402
import trainers  # noqa: E402

LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.0}
BETA = 0.1
PEAK_YARDSTICK = common.CPU_PEAK_FLOPS


@dataclasses.dataclass(frozen=True)
class Task:
  kind: str  # sft | rm | dpo | generate | grpo
  data: str  # sft | pairs | chat_sft | chat_pairs | prompts | rollouts: inputs (and shape)
  reference: str
  lr: float = 0.0
  lora: bool = False


TASKS = {
    "sft": Task("sft", "sft", "TRL SFTTrainer", 5e-5),
    "rm": Task("rm", "pairs", "TRL RewardTrainer", 1e-5),
    "dpo": Task("dpo", "pairs", "TRL DPOTrainer", 5e-6),
    "dpo_lora": Task("dpo", "pairs", "TRL DPOTrainer + peft", 5e-5, lora=True),
    "sft_lora": Task("sft", "sft", "TRL SFTTrainer + peft", 2e-4, lora=True),
    "sft_chat": Task("sft", "chat_sft", "TRL SFTTrainer", 5e-5),
    "rm_chat": Task("rm", "chat_pairs", "TRL RewardTrainer", 1e-5),
    "dpo_chat": Task("dpo", "chat_pairs", "TRL DPOTrainer", 5e-6),
    "dpo_lora_chat": Task("dpo", "chat_pairs", "TRL DPOTrainer + peft", 5e-5, lora=True),
    "generate": Task("generate", "prompts", "transformers generate"),
    "grpo": Task("grpo", "rollouts", "TRL GRPOTrainer", grpo.LEARNING_RATE),
}
# (batch, max length) per data kind; prompts: (batch, prompt length, new tokens); rollouts:
# (prompts, generations per prompt, new tokens).
SHAPES = {"full": {"sft": (8, 64), "pairs": (4, 128), "chat_sft": (8, 128),
                   "chat_pairs": (4, 128), "prompts": (8, 64, 128), "rollouts": (8, 8, 64)},
          "quick": {"sft": (2, 64), "pairs": (2, 64), "chat_sft": (2, 128),
                    "chat_pairs": (2, 128), "prompts": (2, 32, 8), "rollouts": (2, 2, 8)}}


# ------------------------------------------------------------------------------ children

def child(spec_file: str):
  """Runs one (task, implementation) from a spec the parent wrote; prints its result."""
  spec = json.loads(Path(spec_file).read_text())
  task = TASKS[spec["task"]]
  if task.kind == "generate":
    return emit(child_generate(spec))
  if task.kind == "grpo":
    return emit(grpo.child(spec))
  batches = dict(np.load(spec["batches"]))
  if spec["impl"] == "jaxpost":
    config = trainers.jaxpost_config(task.kind, "", spec["steps"], spec["batch_size"],
                                     spec["length"], task.lr, jaxpost_overrides(task, spec))
    result = trainers.run_jaxpost(config, batches)
  else:
    result = trainers.run_trl(task.kind, batches, spec["model_dir"], task.lr, spec["threads"],
                              LORA if task.lora else None, BETA)
  emit(result)


def emit(result: dict):
  common.emit_result({**result, "rss_gb": common.peak_rss_gb()})


def jaxpost_overrides(task: Task, spec: dict) -> dict:
  out = {"model.name_or_path": spec["model_dir"]}
  if task.kind == "dpo":
    out["beta"] = BETA
  if task.lora:
    out.update({f"lora.{k}": v for k, v in LORA.items()})
  return {**out, **spec.get("overrides", {})}


def child_generate(spec: dict) -> dict:
  import generate
  prompts, new, repeats = spec["prompts"], spec["new_tokens"], spec["steps"]
  if spec["impl"] == "jaxpost":
    import jaxpost
    lm = jaxpost.load_model(spec["model_dir"])
    out = generate.bench_jaxpost(lm, prompts, new, repeats)
  else:
    out = generate.bench_hf(generate.load_hf(spec["model_dir"]), prompts, new, repeats,
                            threads=spec["threads"])
  times = [out["seconds"]]  # a median already
  return {"step_times": times, "first_step": out["first"], "check": out["tokens"],
          "cpu_seconds": out["cpu_seconds"]}


# ------------------------------------------------------------------------------ parent

def task_inputs(task: Task, shapes: dict, steps: int, cache: dict, workdir: Path) -> dict:
  """The spec fields shared by both implementations of `task` (inputs built once per kind)."""
  if task.data not in cache:
    if task.data == "rollouts":
      prompts, generations, new = shapes["rollouts"]
      cache["rollouts"] = {"rows": grpo.prompt_rows(prompts, steps, shapes.get("rollout_data")),
                           "batch_size": prompts,
                           "generations": generations, "new_tokens": new, "length": new}
    elif task.data == "prompts":
      from jaxpost.hf import load_tokenizer, resolve_model_dir
      import generate
      batch, prompt_len, new = shapes["prompts"]
      tok = load_tokenizer(resolve_model_dir(trainers.MODEL))
      cache["prompts"] = {"prompts": generate.make_prompts(tok, batch, prompt_len),
                          "new_tokens": new, "batch_size": batch, "length": prompt_len}
    else:
      batch, length = shapes[task.data]
      make = {"sft": trainers.sft_batches, "pairs": trainers.preference_batches,
              "chat_sft": lambda *a: trainers.chat_batches("sft", *a),
              "chat_pairs": lambda *a: trainers.chat_batches("dpo", *a)}[task.data]
      path = workdir / f"{task.data}.npz"
      np.savez(path, **make(length, batch, steps))
      cache[task.data] = {"batches": str(path), "batch_size": batch, "length": length}
  return cache[task.data]


def score_model_dir(workdir: Path) -> str:
  """The bundled model with a score head (jaxpost's N(0, 0.02²) init, seed 0) saved as an HF
  LlamaForSequenceClassification dir, so both reward-model runs start from the same weights."""
  import jaxpost
  out = workdir / "score_model"
  if not out.exists():
    jaxpost.save_model(jaxpost.load_model(trainers.MODEL, head="score"), str(out))
  return str(out)


def run_task(name: str, args, shapes: dict, cache: dict, workdir: Path) -> dict:
  """The spec of task `name` and the child results of jaxpost and of the reference."""
  task = TASKS[name]
  steps = args.steps + (task.kind != "generate")  # + the compile / warm-up step
  spec = {"task": name, "steps": steps, "model_dir": model_dir(task, workdir),
          "threads": args.torch_threads, "overrides": args.overrides,
          **task_inputs(task, shapes, steps, cache, workdir)}
  results = {impl: run_impl(spec, impl, workdir) for impl in ("jaxpost", "reference")}
  return {"spec": spec, **results}


def model_dir(task: Task, workdir: Path) -> str:
  from jaxpost.hf import resolve_model_dir
  if task.kind == "rm":
    return score_model_dir(workdir)
  return str(resolve_model_dir(trainers.MODEL))


def run_impl(spec: dict, impl: str, workdir: Path) -> dict:
  """Runs one implementation ("jaxpost" / "reference") of `spec` in a child process."""
  threads = f", {spec['threads']} torch threads" if impl == "reference" else ""
  label = f"{spec['task']} {impl} (T={spec['length']}{threads})"
  path = workdir / f"{spec['task']}_{impl}_T{spec['length']}_{spec['threads']}.json"
  path.write_text(json.dumps({**spec, "impl": impl}))
  print(f"{label} ...", flush=True)
  result = common.child_result([sys.executable, __file__, f"--child={path}"], label, ROOT)
  if "missing" in result:
    print(f"{label}: {result['missing']}", flush=True)
    return result
  print(f"{label}: median {statistics.median(result['step_times']):.3f} s, first "
        f"{result['first_step']:.1f} s, {check_text(TASKS[spec['task']], result)}", flush=True)
  return result


def check_text(task: Task, result: dict, reference: dict | None = None) -> str:
  """Step-1 and last-step loss, for generation how many rows' greedy tokens equal the
  reference's, for GRPO the mean reward and completion length."""
  if task.kind == "grpo":
    fmt = lambda key, spec: "-" if result[key] is None else format(result[key], spec)
    return (f"reward {fmt('reward', '.3f')}, {fmt('completion_length', '.1f')} tokens/completion; "
            f"rollout {statistics.median(result['rollout_times']):.2f} s + update "
            f"{statistics.median(result['update_times']):.2f} s")
  if task.kind != "generate":
    return f"loss {result['check']:.4f} → {result['last_loss']:.4f}"
  cpu = f"; CPU {result['cpu_seconds']:.2f} s/call" if "cpu_seconds" in result else ""
  if reference is None:
    return "reference tokens" + cpu
  same = sum(a == b for a, b in zip(result["check"], reference["check"]))
  return f"greedy tokens = reference in {same}/{len(reference['check'])} rows" + cpu


def task_flops(task: Task, spec: dict, cfg, result: dict) -> float:
  """Model FLOPs of one step at the padded length; chat rows (each side pads its own way): at
  the mean real length, i.e. the useful work only."""
  if task.kind == "generate":
    return common.generate_flops(cfg, spec["batch_size"], spec["length"], spec["new_tokens"])
  rows = spec["batch_size"] * (1 if task.kind == "sft" else 2)
  length = (tokens_per_step(task, spec, result) / rows if is_chat(task) else spec["length"])
  return common.train_step_flops(cfg, rows, length, frozen_weights=task.lora,
                                 reference=task.kind == "dpo", score_head=task.kind == "rm")


def is_chat(task: Task) -> bool:
  return task.data.startswith("chat_")


def tokens_per_step(task: Task, spec: dict, result: dict) -> float:
  """Real (non-pad) trained tokens per step; new tokens per call for generation; sampled
  completion tokens per iteration for GRPO."""
  if task.kind == "grpo":
    length = result["completion_length"]
    return None if length is None else spec["batch_size"] * spec["generations"] * length
  if task.kind == "generate":
    return spec["batch_size"] * spec["new_tokens"]
  return trainers.real_tokens_per_step(dict(np.load(spec["batches"])))


HEADER = ["task", "impl", "shape (B x T)", "median step (s)", "tokens/s", "jaxpost / ref",
          "MFU", f"MFU @{PEAK_YARDSTICK / 1e9:.0f}G", "peak RSS (GB)",
          "compile / first step (s)", "check"]


def table_row(label: str, spec: dict, result: dict, ratio: str, cfg, peak: float,
              reference: dict | None = None) -> list:
  """One row under HEADER; `reference` (generation) is the result to compare tokens with."""
  task = TASKS[spec["task"]]
  shape = (f"{spec['batch_size']} x {spec['generations']} x {spec['new_tokens']}"
           if task.kind == "grpo" else f"{spec['batch_size']} x {spec['length']}")
  if task.kind == "generate":
    shape += f"+{spec['new_tokens']}"
  if is_chat(task):
    shape = f"{spec['batch_size']} x <= {spec['length']}, chat"
  if "missing" in result:
    return [spec["task"], label, shape] + ["-"] * 7 + [result["missing"]]
  median = statistics.median(result["step_times"])
  tokens = tokens_per_step(task, spec, result)  # None: GRPO without completion lengths
  mfu = (["-", "-"] if task.kind == "grpo" else  # sampled lengths: no fixed model FLOPs
         [f"{100 * task_flops(task, spec, cfg, result) / median / p:.1f}%"
          for p in (peak, PEAK_YARDSTICK)])
  return [spec["task"], label, shape, f"{median:.3f}",
          "-" if tokens is None else f"{tokens / median:.1f}", ratio, *mfu,
          f"{result['rss_gb']:.2f}", f"{result['first_step']:.1f}",
          check_text(task, result, reference)]


def speedup(ours: dict, reference: dict) -> float:
  """jaxpost tokens/s over the reference's (same tokens per step: median time ratio); GRPO: the
  whole-iteration time ratio (each side samples its own completion lengths)."""
  return statistics.median(reference["step_times"]) / statistics.median(ours["step_times"])


def table_rows(run: dict, cfg, peak: float) -> list[list]:
  spec, ours, ref = run["spec"], run["jaxpost"], run["reference"]
  is_gen = TASKS[spec["task"]].kind == "generate"
  ratio = "-" if "missing" in ours else f"**{speedup(ours, ref):.2f}x**"
  return [table_row("jaxpost", spec, ours, ratio, cfg, peak, ref if is_gen else None),
          table_row(TASKS[spec["task"]].reference, spec, ref, "1.00x", cfg, peak)]


def notes(args, peak: float, load: tuple) -> str:
  lora = (f"LoRA rank {LORA['rank']}, alpha {LORA['alpha']:g}, dropout {LORA['dropout']:g} on "
          "q/k/v/o/gate/up/down (jaxpost `lora.*`, peft `target_modules` of the same seven)")
  return " ".join([
      "SmolLM2-135M-Instruct (bundled), fp32 weights and compute on both sides; built-in",
      "arithmetic rows (SFT: prompt/completion, completion-only loss; RM/DPO: preference pairs",
      "whose prompts are filled with solved examples up to the length), tokenised once by",
      "jaxpost's loader and handed to TRL pre-tokenised; every TRL child asserts its collated",
      "input ids, attention masks and loss masks equal jaxpost's at every step. The check",
      "column gives the step-1 loss -> the last step's (before its update) on each side: equal",
      "step-1 losses mean the same forward (DPO starts at log 2; RM from the same saved score",
      "head), close last-step losses the same optimiser updates.",
      "The *_chat rows run completion-heavy conversational rows (benchmarks/trainers.py",
      "`chat_rows`: a short user turn, ~30 tokens with the template's system prompt; chosen ~45,",
      "rejected ~35 tokens; SFT trains on the chosen reply) with each side's default padding:",
      "jaxpost its default length buckets (multiples of max_length / 8), TRL each batch to its",
      "longest row; their MFU counts the real tokens' FLOPs only (useful work).",
      f"Median of {args.steps} timed steps after the first (jaxpost: XLA compilation; TRL:",
      "eager warm-up) — generation: median of as many calls after the first. tokens/s counts",
      "real (non-pad) tokens per step (chosen + rejected for pairs; new tokens for generation);",
      "the ratio is jaxpost's tokens/s over the reference's. AdamW, cosine schedule without",
      f"warm-up, the same learning rate on both sides; DPO sigmoid loss, beta {BETA}. {lora}.",
      "MFU = model FLOPs of the padded step / median step time / peak, with F = forward FLOPs",
      "per token (`forward_flops_per_token`: weight matmuls W + attention A): full finetuning",
      "3F; LoRA 2W + 3A (frozen base weights get no weight gradient; adapters not counted);",
      "DPO adds one reference forward F; the reward model's head is [D, 1] (no LM head);",
      "generation counts the prompt forward plus one-token forwards at the mean context; its",
      "check column adds each side's median CPU seconds per call (all threads): the cost,",
      "which other jobs on the cores inflate less than the wall time.",
      "GRPO (benchmarks/grpo.py; shape prompts x completions per prompt x max new tokens): one",
      "iteration = rollout (built-in arithmetic prompts, temperature 1, stop at EOS, jaxpost's",
      f"verifier as reward) + one DAPO update (beta 0, lr {grpo.LEARNING_RATE:g}); the step is",
      "the whole iteration, tokens/s counts sampled completion tokens (their number differs per",
      "side: sampled lengths), and there is no MFU (no fixed shape).",
      f"MFU uses the 2048² fp32 matmul rate measured at the start of this run ({peak / 1e9:.0f}",
      f"GFLOP/s); the next column uses DESIGN.md's yardstick ({PEAK_YARDSTICK / 1e9:.0f}",
      f"GFLOP/s). TRL and transformers ran with torch.set_num_threads({args.torch_threads})",
      "only (the standalone sft.py / dpo.py also try 1 thread, which wins only on a busy",
      "machine); XLA uses its default thread pool. Peak RSS is each child process's maximum",
      f"resident set. 1-minute load average {load[0]:.2f} before, {load[1]:.2f} after.",
      common.versions("jax", "flax", "optax", "torch", "transformers", "trl", "peft",
                      "accelerate") + "."])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default=",".join(TASKS), help="comma-separated task names")
  parser.add_argument("--steps", type=int, default=None, help="timed steps (default 4; quick 2)")
  parser.add_argument("--torch_threads", type=int, default=os.cpu_count())
  parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
  parser.add_argument("--write", action="store_true",
                      help="write results/suite.md and BENCHMARKS.md even for a subset or --quick "
                      "(a full run always does)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a jaxpost config key, e.g. model.scan_layers=False "
                      "(repeatable; such a run is printed, not written)")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args.child)
  try:
    args.overrides = parse_overrides(args.set)
  except ValueError as e:
    parser.error(str(e))
  names = args.only.split(",")
  unknown = set(names) - set(TASKS)
  if unknown:
    parser.error(f"--only: unknown task(s) {sorted(unknown)}; choose from {list(TASKS)}")
  args.steps = args.steps or (2 if args.quick else 4)
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  run_suite(args, names)


def parse_overrides(items: list[str]) -> dict:
  """["model.scan_layers=False", ...] -> {"model.scan_layers": False}; values are Python
  literals, or strings when they do not parse as one."""
  import ast
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set {item!r}: expected KEY=VALUE")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def run_suite(args, names: list[str]):
  from jaxpost.hf import read_hf_config, resolve_model_dir
  from jaxpost.models.config import LlamaConfig
  cfg = LlamaConfig.from_hf(read_hf_config(resolve_model_dir(trainers.MODEL)))
  load_before = os.getloadavg()[0]
  peak = common.measured_matmul_flops()
  shapes = SHAPES["quick" if args.quick else "full"]
  table = [HEADER]
  cache = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      table += table_rows(run_task(name, args, shapes, cache, Path(tmp)), cfg, peak)
  command = " ".join(["python benchmarks/run.py", f"--only={','.join(names)}",
                      f"--steps={args.steps}", f"--torch_threads={args.torch_threads}"]
                     + ["--quick"] * args.quick + [f"--set={item}" for item in args.set])
  complete = names == list(TASKS) and not args.quick and not args.set
  title = "Suite: jaxpost vs TRL / transformers, SmolLM2-135M fp32"
  if not complete:  # a subset is its own section, next to the full suite's
    title += f" ({', '.join(names)})"
  common.write_result("suite" if complete else "suite_" + "-".join(names), title, command,
                      table, notes(args, peak, (load_before, os.getloadavg()[0])),
                      save=complete or args.write)
  if complete or args.write:
    import report
    report.main()


if __name__ == "__main__":
  main()
