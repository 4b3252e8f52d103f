"""GRPO speed: one iteration of jaxpost vs TRL GRPOTrainer, SmolLM2-135M fp32, same run.

    PYTHONPATH=/tmp/trl_site python benchmarks/grpo.py [--steps=3] [--prompts=8]
        [--generations=8] [--new_tokens=64] [--torch_threads=N] [--write]
        [--gsm8k=../shared/data/gsm8k_train.jsonl]   # real prompts: results/grpo_gsm8k.md

One GRPO iteration (Shao et al. 2024, arXiv:2402.03300) = rollout (sample G completions of up to
N new tokens for each of P prompts, score them) + update (one optimiser step on the P x G rows).
Both sides run the bundled SmolLM2-135M-Instruct in fp32 on the first P-prompt batches of
jaxpost's loader over the built-in arithmetic task (kind "prompt", shuffle off, rendered with the
model's chat template; with --gsm8k the first GSM8K questions instead, answer = the number after
"####"), sample at temperature 1 with the model's EOS as the stop token, and score
with jaxpost's built-in arithmetic verifier (`jaxpost.rewards.load("builtin:arithmetic")`, wrapped
for TRL's reward signature). Loss: DAPO token-level normaliser, beta 0 (no reference model), one
update per rollout (num_iterations 1, so the clipped ratio is 1 and no old-policy forward is
needed), AdamW at the same learning rate, no warm-up, gradient clipping at norm 1.

  jaxpost  `jaxpost.configs.get("grpo")` through `jaxpost.train`, log_every 1; step_time,
           time/rollout, time/update and compile_time from metrics.jsonl; twice: with the
           default group prefix sharing and with data.prefix_sharing=False (same samples)
  TRL      trl.GRPOTrainer (transformers generate, no vLLM), num_generations G,
           per_device_train_batch_size P x G (TRL counts completions: one generation batch of P
           prompts x G per optimiser step), gradient_accumulation_steps 1; rollout =
           `_generate_and_score_completions` (generation + reward + advantages), whole step =
           on_step_begin -> on_step_end, update = whole - rollout. Asserts that its prompt token
           ids equal jaxpost's loader's, each prompt repeated G times, at every step.

`--steps` iterations are timed after one warm-up iteration (jaxpost: XLA compilation) and the
median reported. Completion lengths are sampled, so they differ between the sides; the table
gives each side's mean completion length and reward. When jaxpost has no "grpo" recipe yet, only
TRL runs and the table is printed, not written. Each side runs in its own child process
(benchmarks/run.py's `grpo` task); writes benchmarks/results/grpo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).parent)]
import common  # noqa: E402

MODEL = "bundled:smollm2-135m-instruct"
REWARD = "builtin:arithmetic"
LEARNING_RATE = 1e-6  # TRL GRPOConfig's default
GSM8K_PROMPT_TOKENS = 256  # data.max_length of --gsm8k: every rendered train question (<= 253)
RECIPE_KEYS = {"grpo.loss_type": "dapo", "grpo.num_iterations": 1, "rollout.temperature": 1.0}


# ------------------------------------------------------------------------------ inputs

def prompt_rows(prompts: int, steps: int, data_keys: dict | None = None) -> list[dict]:
  """The first `steps` batches of `prompts` rows of jaxpost's prompt loader over the built-in
  arithmetic task, or the `data_keys` (`gsm8k_keys`) prompts (shuffle off): {"prompt":
  messages, "answer", "prompt_ids": rendered ids}."""
  from jaxpost.data.config import data_defaults
  from jaxpost.data.loader import build_loader
  from jaxpost.hf import load_tokenizer, resolve_model_dir
  data = data_defaults()
  data.update({"train": REWARD, "eval": None, "shuffle": False, "prefetch": 0,
               **(data_keys or {})})
  loader = build_loader(data, load_tokenizer(resolve_model_dir(MODEL)), "prompt", prompts)
  rows = []
  for _ in range(steps):
    batch = next(loader)
    for ids, mask, row in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"],
                              batch["row"]):
      example = loader.example(int(row))
      rows.append({"prompt": example["prompt"], "answer": int(example["answer"]),
                   "prompt_ids": ids[mask == 1].tolist()})
  loader.close()
  return rows


def gsm8k_keys(source: Path, out_dir: Path) -> dict:
  """The data keys of GSM8K prompts: `source` (openai/grade-school-math jsonl: question, answer
  ending in "#### <number>") written to out_dir as prompt rows {"prompt": question, "answer":
  the number} (the arithmetic verifier scores the final number against it), with a
  data.max_length that holds every rendered question."""
  out = out_dir / "gsm8k_prompts.jsonl"
  with open(source) as f, open(out, "w") as w:
    for line in f:
      row = json.loads(line)
      answer = int(row["answer"].split("####")[-1].strip().replace(",", ""))
      w.write(json.dumps({"prompt": row["question"], "answer": answer}) + "\n")
  return {"train": str(out), "max_length": GSM8K_PROMPT_TOKENS}


def recipe():
  """jaxpost's "grpo" recipe, or the reason there is none (a string)."""
  import jaxpost.configs
  try:
    return jaxpost.configs.get("grpo")
  except (ValueError, ImportError) as err:
    return f"no jaxpost GRPO recipe yet (jaxpost.configs.get('grpo'): {err})"


def child(spec: dict) -> dict:
  """One side of the benchmark (run.py's `grpo` task child); jaxpost without a "grpo" recipe
  gives {"missing": why}."""
  if spec["impl"] != "jaxpost":
    return run_trl(spec)
  config = recipe()
  return {"missing": config} if isinstance(config, str) else run_jaxpost(config, spec)


# ------------------------------------------------------------------------------ jaxpost

def jaxpost_config(c, spec: dict, workdir: str):
  """The "grpo" recipe `c` set up for a timed run (`timed_run_keys`), beta 0, RECIPE_KEYS where
  the recipe has them; then the suite's --set overrides."""
  present = c.to_dict()
  c.update_from_flattened_dict({
      **timed_run_keys(spec, workdir, LEARNING_RATE), "grpo.num_generations": spec["generations"],
      "grpo.beta": 0.0,
      **{k: v for k, v in RECIPE_KEYS.items() if recipe_value(present, k) is not None},
      **spec.get("overrides", {})})
  return c


def timed_run_keys(spec: dict, workdir: str, learning_rate: float) -> dict:
  """The keys that set a rollout recipe up for a timed run: the spec's model, batch, new tokens
  and steps, fp32, log every step, no eval, report, checkpoint or export, AdamW at
  `learning_rate` without warm-up or weight decay, gradient clipping at norm 1."""
  return {
      "workdir": workdir, "max_steps": spec["steps"], "batch_size": spec["batch_size"],
      "rollout.max_new_tokens": spec["new_tokens"], "log_every": 1, "eval_at_start": False,
      "eval_every": 0, "data.eval": None, "data.shuffle": False, "report.task": "",
      "export_hf": "", "checkpoint.every": -1, "metrics.tensorboard": False,
      "metrics.progress_bar": False, "model.name_or_path": spec["model_dir"],
      "model.dtype": "float32", "model.param_dtype": "float32",
      "optimizer.learning_rate": learning_rate, "optimizer.warmup_steps": 0,
      "optimizer.weight_decay": 0.0, "optimizer.max_grad_norm": 1.0}


def recipe_value(config: dict, key: str):
  """config["a"]["b"] for key "a.b", None where the recipe has no such key."""
  section, name = key.split(".")
  return config.get(section, {}).get(name)


def run_jaxpost(config, spec: dict) -> dict:
  """`spec["steps"]` GRPO iterations with jaxpost.train; times of the steps after the first
  (the loop reports the first, mostly compilation, as compile_time)."""
  with tempfile.TemporaryDirectory() as workdir:
    config = jaxpost_config(config, spec, workdir)
    settings = {k: recipe_value(config.to_dict(), k) for k in RECIPE_KEYS}
    settings["grad_accum"] = config.grad_accum  # the recipe's microbatches of the update
    result, timed_records = train_timed(config)
  return {**result, "reward": mean_of(timed_records, "reward"),
          "settings": {k: v for k, v in settings.items() if v is not None}}


def train_timed(config) -> tuple[dict, list[dict]]:
  """Runs `jaxpost.train(config)` (a rollout recipe, log_every 1) and returns ({step_times,
  rollout_times, update_times, first_step, completion_length}, the timed steps' metrics
  records): the loop reports the first step, mostly compilation, apart as compile_time."""
  import jaxpost
  jaxpost.train(config)
  records = [json.loads(line) for line in open(Path(config.workdir) / "metrics.jsonl")]
  first = next(r for r in records if "compile_time" in r)
  timed_records = [r for r in records if "step_time" in r]
  return {"step_times": [r["step_time"] for r in timed_records],
          "rollout_times": [r["time/rollout"] for r in timed_records],
          "update_times": [r["time/update"] for r in timed_records],
          "first_step": first["compile_time"],
          "later_compile": sum(r.get("time/compile", 0.0) for r in timed_records),
          "widths": sorted({r["update/shared_width"] for r in timed_records
                            if "update/shared_width" in r}),
          "fill": mean_of(timed_records, "update/shared_fill"),
          "completion_length": mean_of(timed_records, "completions/mean_length")}, timed_records


def mean_of(records: list[dict], key: str):
  values = [r[key] for r in records if key in r]
  return statistics.mean(values) if values else None


# ------------------------------------------------------------------------------ TRL

def trl_reward():
  """jaxpost's arithmetic verifier with TRL's reward signature (the `answer` column as kwarg)."""
  import jaxpost.rewards
  rewards = jaxpost.rewards.load(REWARD)

  def arithmetic(prompts, completions, answer, **_):
    return rewards(prompts, completions, {"answer": answer}).total.tolist()

  return arithmetic


def timed_trainer_class(rollouts: list):
  """GRPOTrainer appending (seconds, prompt ids, prompt mask, completion mask) of every
  `_generate_and_score_completions` call (generation + reward + advantages) to `rollouts`."""
  import trl

  class TimedGRPO(trl.GRPOTrainer):
    def _generate_and_score_completions(self, inputs):
      start = time.perf_counter()
      out = super()._generate_and_score_completions(inputs)
      rollouts.append((time.perf_counter() - start, out["prompt_ids"].numpy(),
                       out["prompt_mask"].numpy(), out["completion_mask"].numpy()))
      return out

  return TimedGRPO


def trl_config(spec: dict, out: str):
  import trl
  return trl.GRPOConfig(
      output_dir=out, num_generations=spec["generations"],
      per_device_train_batch_size=spec["batch_size"] * spec["generations"],
      gradient_accumulation_steps=1, max_completion_length=spec["new_tokens"], beta=0.0,
      loss_type="dapo", num_iterations=1, temperature=1.0, max_steps=spec["steps"],
      learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
      max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
      bf16=False, shuffle_dataset=False, seed=0)


def run_trl(spec: dict) -> dict:
  """`spec["steps"]` GRPOTrainer steps on the spec's prompt rows; times after the first."""
  import datasets
  import torch
  import transformers
  torch.set_num_threads(spec["threads"])
  rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in spec["rows"]]
  steps, rollouts = [], []
  with tempfile.TemporaryDirectory() as out:
    trainer = timed_trainer_class(rollouts)(
        model=transformers.AutoModelForCausalLM.from_pretrained(spec["model_dir"],
                                                                dtype=torch.float32),
        reward_funcs=trl_reward(), args=trl_config(spec, out),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(spec["model_dir"]),
        callbacks=[common.step_timer(steps)])
    trainer.train()
  check_prompts(spec, [r[1:3] for r in rollouts])
  rollout_times = [r[0] for r in rollouts]
  logs = [r for r in trainer.state.log_history if "reward" in r][1:]
  return {"step_times": steps[1:], "rollout_times": rollout_times[1:],
          "update_times": [s - r for s, r in zip(steps[1:], rollout_times[1:])],
          "first_step": steps[0], "reward": statistics.mean(r["reward"] for r in logs),
          "completion_length": statistics.mean(float(m.sum(1).mean()) for *_, m in rollouts[1:]),
          "settings": {k: getattr(trainer.args, k.split(".")[1]) for k in RECIPE_KEYS
                       if hasattr(trainer.args, k.split(".")[1])}}


def check_prompts(spec: dict, seen: list):
  """Raises unless TRL's rollout s sampled from rows s*P .. s*P+P-1, each G times in a row,
  with exactly the token ids of jaxpost's loader."""
  P, G = spec["batch_size"], spec["generations"]
  if len(seen) != spec["steps"]:
    raise RuntimeError(f"TRL made {len(seen)} rollouts, expected {spec['steps']}")
  for step, (ids, mask) in enumerate(seen):
    for r in range(P * G):
      want = spec["rows"][step * P + r // G]["prompt_ids"]
      if ids[r][mask[r] == 1].tolist() != want:
        raise RuntimeError(f"TRL rollout {step + 1} row {r}: prompt ids differ from jaxpost's "
                           f"loader (prompt {step * P + r // G})")


# ------------------------------------------------------------------------------ table

HEADER = ["framework", "prompts x G, new tokens", "rollout (s)", "update (s)", "whole step (s)",
          "jaxpost / TRL (step)", "mean completion tokens", "mean reward", "peak RSS (GB)",
          "compile / first step (s)"]


def table_row(label: str, spec: dict, result: dict, ratio: str) -> list:
  if "missing" in result:
    return [label, shape_text(spec)] + ["-"] * 3 + [ratio, "-", "-", "-", result["missing"]]
  fmt = lambda v, f: "-" if v is None else format(v, f)
  median = lambda k: f"{statistics.median(result[k]):.2f}"
  return [label, shape_text(spec), median("rollout_times"), median("update_times"),
          median("step_times"), ratio, fmt(result["completion_length"], ".1f"),
          fmt(result["reward"], ".3f"), f"{result['rss_gb']:.2f}", f"{result['first_step']:.1f}"]


def shape_text(spec: dict) -> str:
  return f"{spec['batch_size']} x {spec['generations']}, {spec['new_tokens']}"


def fill_text(ours: dict) -> str:
  """The mean share of real tokens in the shared update rows, as a percentage."""
  return "-" if ours.get("fill") is None else f"{100 * ours['fill']:.0f}%"


def speedup_text(ours: dict, reference: dict, times: str = "step_times") -> str:
  """reference / ours median `times`, bold; "-" when a side did not run."""
  if "missing" in ours or "missing" in reference:
    return "-"
  return f"**{statistics.median(reference[times]) / statistics.median(ours[times]):.2f}x**"


def main():
  import run
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3, help="timed iterations after the first")
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--generations", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--torch_threads", type=int, default=os.cpu_count())
  parser.add_argument("--gsm8k", default=None, metavar="JSONL",
                      help="prompts from GSM8K (e.g. ../shared/data/gsm8k_train.jsonl) instead "
                           "of the built-in arithmetic task; writes results/grpo_gsm8k.md")
  parser.add_argument("--write", action="store_true",
                      help="write results/grpo.md even when only TRL ran")
  args = parser.parse_args()
  shape = (args.prompts, args.generations, args.new_tokens)
  load = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    data = gsm8k_keys(Path(args.gsm8k), Path(tmp)) if args.gsm8k else {}
    overrides = {f"data.{k}": v for k, v in data.items()}
    outcome = run.run_task("grpo", argparse.Namespace(
        steps=args.steps, torch_threads=args.torch_threads, overrides=overrides),
        {"rollouts": shape, "rollout_data": data}, {}, Path(tmp))
    spec, ours, ref = outcome["spec"], outcome["jaxpost"], outcome["reference"]
    unshared = run.run_impl({**spec, "overrides": {**overrides, "data.prefix_sharing": False}},
                            "jaxpost", Path(tmp))
  ratio = speedup_text(ours, ref)
  table = [HEADER, table_row("jaxpost (groups prefix-shared, default)", spec, ours, ratio),
           table_row("jaxpost, data.prefix_sharing=False", spec, unshared,
                     speedup_text(unshared, ref)),
           table_row(run.TASKS["grpo"].reference, spec, ref, "1.00x")]
  common.write_result(
      "grpo_gsm8k" if args.gsm8k else "grpo",
      "GRPO: one iteration, jaxpost vs TRL GRPOTrainer, SmolLM2-135M fp32"
      + (", GSM8K prompts" if args.gsm8k else ""),
      f"PYTHONPATH=/tmp/trl_site python benchmarks/grpo.py --steps={args.steps} "
      f"--prompts={args.prompts} --generations={args.generations} "
      f"--new_tokens={args.new_tokens} --torch_threads={args.torch_threads}"
      + (f" --gsm8k={args.gsm8k}" if args.gsm8k else ""), table,
      notes(args, ours, unshared, ref, ratio, load), save=args.write or "missing" not in ours)


def notes(args, ours: dict, unshared: dict, ref: dict, ratio: str, load: float) -> str:
  settings = lambda r: ", ".join(f"{k}={v}" for k, v in r.get("settings", {}).items()) or "-"
  return " ".join([
      f"jaxpost / TRL whole-step time: {ratio} (target >= 2x).",
      "Prefix sharing (algos/shared_groups.py): the update runs on [prompt | y_1 | ... |",
      "y_G] groups packed into rows (a segment each) instead of G [prompt | y_j] rows; the",
      f"same math (tests/test_shared_groups.py); update time unshared / shared: {speedup_text(ours, unshared, 'update_times')}",
      "(target >= 2x).",
      f"{args.prompts} prompts of", "the first GSM8K questions (data.max_length "
      f"{GSM8K_PROMPT_TOKENS})" if args.gsm8k else "the built-in arithmetic task",
      "per iteration (jaxpost's prompt",
      "loader, shuffle off, the model's chat template; TRL's prompt token ids asserted equal),",
      f"{args.generations} sampled completions each (temperature 1, up to {args.new_tokens} new",
      "tokens, stop at EOS), reward = jaxpost's arithmetic verifier (1 = right final number).",
      "DAPO loss, beta 0, one update per rollout, AdamW lr",
      f"{LEARNING_RATE:g}, full fine-tune, fp32 on both sides. Rollout: sampling + reward +",
      "advantages (with num_iterations 1 neither side recomputes the sampled tokens'",
      "log-probs: the update's forward is the old policy); update: loss, backward and",
      "optimiser step (jaxpost: in the recipe's grad_accum microbatches, exact accumulation;",
      "TRL: one batch, gradient_accumulation_steps 1); whole step: both and the bookkeeping",
      "between. Median of",
      f"{args.steps} timed iterations after the first (jaxpost: XLA compilation; TRL: eager",
      "warm-up). The shared update packs the groups into rows as wide as their sampled lengths",
      "need and compiles once per width (at most 16; update/shared_width), timed apart as",
      "time/compile and left out of the step and update times: the timed iterations used",
      f"widths {ours.get('widths')} (real tokens {fill_text(ours)} of the shared slots), compiled",
      f"{ours.get('later_compile', 0.0):.1f} s for new ones. Completion lengths are sampled, so",
      "each side decodes its own number of tokens",
      "(generation stops once every row has emitted EOS): mean completion tokens per row over the",
      f"timed iterations. Recipe keys: jaxpost {settings(ours)}; TRL {settings(ref)}. TRL ran",
      f"with torch.set_num_threads({args.torch_threads}); XLA uses its default thread pool.",
      f"Peak RSS is each child process's maximum resident set. 1-minute load average {load:.2f}",
      f"before, {os.getloadavg()[0]:.2f} after.",
      common.versions("jax", "flax", "optax", "torch", "transformers", "trl", "accelerate") + "."])


if __name__ == "__main__":
  main()
