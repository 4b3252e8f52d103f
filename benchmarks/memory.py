"""Memory levers: peak memory and step cost of each config lever, SmolLM2-135M, SFT and DPO.

    python benchmarks/memory.py [--steps=3] [--only=baseline,remat_full,dpo:precompute_ref]
    python benchmarks/memory.py --raw=/tmp/memory.json  # keep raw rows: resume, re-render
    python benchmarks/memory.py --quick   # tiny random model, B=4 x T=128; prints, saves nothing
    python benchmarks/memory.py --length=512 --only=dpo:baseline  # other T: memory_T512.md

Every row is one `jaxpost.train(config)` run of the bundled SmolLM2-135M-Instruct in a fresh
child process, since the RSS high-water mark is per process. The baseline is fp32 params and
compute, `model.remat_policy="none"`, `logprob_chunk_size=32`, `grad_accum=1`, full fine-tune;
each other row changes one lever (LEVERS below) at the same global batch:

  SFT  B=8 rows x T=256, built-in arithmetic task, packed (`data.packing`) so rows are full
  DPO  B=4 pairs x T=256 per side, arithmetic pairs with prompts filled by solved examples up
       to T (benchmarks/trainers.py `filled_rows`), reference = initial policy, sigmoid loss

Reported per row: the child's peak RSS (model load, compilation and training together) and its
RSS just before the train step compiles; XLA's memory analysis of the compiled train step
(`Compiled.memory_analysis()`: temp = activations, gradients and workspace; arguments = params,
optimiser state, frozen trees the step reads, batch; deterministic, free of RSS noise); the
median wall and CPU (all threads) seconds of steps 2..steps (step 1 compiles); the step-1 loss
(a check that the rows do the same work). GB means 2^30 bytes. The train step is compiled ahead
of time on its first call (`AotStep`) so that the analysis is of the executable that trains.
`--only` takes lever names (both algorithms) or `sft:<lever>` / `dpo:<lever>`.
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
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import child_result, emit_result, peak_rss_gb, versions, write_result  # noqa: E402

GB = 2**30
ALGOS = ("sft", "dpo")
SHAPES = {"sft": (8, 256), "dpo": (4, 256)}  # (rows or pairs per step, tokens per row)
QUICK_SHAPE = (4, 128)
BASELINE = {"model.dtype": "float32", "model.param_dtype": "float32",
            "model.remat_policy": "none", "logprob_chunk_size": 32, "grad_accum": 1,
            "model.scan_layers": True, "lora.rank": 0}
LEVERS = {  # name -> config overrides on top of BASELINE
    "baseline": {},
    "remat_full": {"model.remat_policy": "full"},
    "remat_dots": {"model.remat_policy": "dots"},
    "remat_dots_no_batch": {"model.remat_policy": "dots_no_batch"},
    "bf16": {"model.param_dtype": "bfloat16", "model.dtype": "bfloat16"},
    "chunk8": {"logprob_chunk_size": 8},
    "chunk128": {"logprob_chunk_size": 128},
    "accum2": {"grad_accum": 2},
    "accum4": {"grad_accum": 4},
    "precompute_ref": {"precompute_ref": True},
    "lora16": {"lora.rank": 16},
    "unscanned": {"model.scan_layers": False},
}
DPO_ONLY = ("precompute_ref",)


def selected_rows(only: str) -> list[tuple[str, str]]:
  """(algorithm, lever) pairs in table order; `only` = comma-separated `lever` / `algo:lever`."""
  rows = [(a, lever) for a in ALGOS for lever in LEVERS if a == "dpo" or lever not in DPO_ONLY]
  if not only:
    return rows
  wanted = set()
  for item in only.split(","):
    algo, _, lever = item.strip().rpartition(":")
    if lever not in LEVERS or algo not in ("", *ALGOS):
      raise ValueError(f"--only: unknown row {item!r}; levers: {', '.join(LEVERS)}, optionally "
                       f"prefixed with one of {ALGOS} and ':'")
    if algo == "sft" and lever in DPO_ONLY:
      raise ValueError(f"--only: {item!r}: {lever} is a DPO lever")
    wanted |= {(a, lever) for a in ([algo] if algo else ALGOS)}
  return [r for r in rows if r in wanted]


def shape(args, algo: str) -> tuple[int, int]:
  """(rows or pairs, tokens per row) of `algo`'s rows; `--length` replaces the tokens."""
  batch, length = QUICK_SHAPE if args.quick else SHAPES[algo]
  return batch, args.length or length


def run_config(algo: str, lever: str, args, workdir: str):
  """The suite's (benchmarks/run.py) recipe config for this row, the lever applied."""
  from jaxpost.configs import sft as sft_config
  import run
  import trainers
  batch_size, length = shape(args, algo)
  extra = {"beta": run.BETA} if algo == "dpo" else {}
  c = trainers.jaxpost_config(algo, workdir, args.steps, batch_size, length,
                              run.TASKS[algo].lr, extra)
  if algo == "sft":
    c.data.packing = True
  else:  # jaxpost builds the loader from the rows, so precompute_ref can score exactly them
    with c.ignore_type():
      c.data.train = trainers.preference_rows(length, args.steps * batch_size)
    c.data.shuffle = False
    c.precompute_ref = False
  if args.quick:
    sft_config._tiny(c)  # noqa: SLF001 (the recipes' shared tiny-model variant)
  c.update_from_flattened_dict({**BASELINE, **LEVERS[lever], "workdir": workdir,
                                "max_steps": args.steps, "report.task": ""})
  return c


def current_rss_gb() -> float:
  """Resident memory of this process now (GB), from /proc/self/status."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) / 2**20
  return float("nan")


class AotStep:
  """A jitted step compiled ahead of time on its first call, then called as that executable
  (same work, donation included), recording on the way: the resident memory before compiling
  (model, optimiser state, data) and the RSS peak once compiled (before running), and at every
  call (wall, process CPU) seconds; with log_every=1 the loop syncs after each step, so
  consecutive marks bound one step."""

  def __init__(self, jitted):
    self.jitted, self.compiled, self.marks, self.rss = jitted, None, [], {}

  def __call__(self, *args):
    self.mark()
    if self.compiled is None:
      self.rss["before_compile"] = current_rss_gb()
      self.compiled = self.jitted.lower(*args).compile()
      self.rss["peak_compiled"] = peak_rss_gb()
    return self.compiled(*args)

  def mark(self):
    self.marks.append((time.perf_counter(), time.process_time()))

  def summary(self) -> dict:
    """XLA's memory analysis (GB: temp, argument, output, alias = donated outputs), the RSS
    marks and the CPU seconds (all threads) of every step after the first."""
    stats = self.compiled.memory_analysis()
    marks = self.marks[1:] + [(time.perf_counter(), time.process_time())]
    return {"xla": {k: getattr(stats, f"{k}_size_in_bytes") / GB
                    for k in ("temp", "argument", "output", "alias")},
            "rss_marks": self.rss,
            "cpu_step_times": [b[1] - a[1] for a, b in zip(marks, marks[1:])]}


def train_with_analysis(config) -> dict:
  """Runs `jaxpost.train(config)` with its train step wrapped in `AotStep`; its summary."""
  import jaxpost
  from jaxpost.train import loop
  steps = []

  class Trainer(loop.Trainer):
    def run(self):
      self.train_step = AotStep(self.train_step)
      steps.append(self.train_step)
      return super().run()

  with mock.patch.object(loop, "Trainer", Trainer):
    jaxpost.train(config)
  return steps[0].summary()


def child(args):
  """One row in this (fresh) process; prints its RESULT line."""
  algo, lever = args.child.split(":")
  with tempfile.TemporaryDirectory() as workdir:
    result = train_with_analysis(run_config(algo, lever, args, workdir))
    records = [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]
  records = [r for r in records if "loss" in r]
  emit_result({**result, "rss_gb": peak_rss_gb(), "loss": records[0]["loss"],
               "compile_s": records[0]["compile_time"],
               "step_times": [r["step_time"] for r in records[1:]]})


def measure(args, rows) -> dict:
  """{(algo, lever): result dict, or {"error": last error line}} for each row, one child each.
  Rows already in the `--raw` file are reused; each new one is added to it as it finishes."""
  raw = Path(args.raw) if args.raw else None
  saved = json.loads(raw.read_text()) if raw and raw.exists() else {}
  for algo, lever in rows:
    key = f"{algo}:{lever}"
    if key in saved and "error" not in saved[key]:
      continue
    cmd = [sys.executable, __file__, f"--child={key}", f"--steps={args.steps}"]
    cmd += ["--quick"] * args.quick + [f"--length={args.length}"] * bool(args.length)
    load = os.getloadavg()[0]
    print(f"{key} (load {load:.1f}) ...", file=sys.stderr, flush=True)
    try:
      result = child_result(cmd, key, cwd=ROOT)
      result.update(step_s=statistics.median(result["step_times"]), load=load)
    except RuntimeError as e:
      lines = str(e).strip().splitlines()
      result = {"error": next((l for l in reversed(lines) if "Error" in l), lines[-1])[:200]}
    saved[key] = result
    print(f"  {result}", file=sys.stderr, flush=True)
    if raw:
      raw.write_text(json.dumps(saved, indent=1))
  return {(a, lever): saved[f"{a}:{lever}"] for a, lever in rows}


def load_range(results: dict) -> str:
  loads = [r["load"] for r in results.values() if "load" in r]
  return f"{min(loads):.1f} to {max(loads):.1f}" if loads else "unknown"


def describe(lever: str) -> str:
  return ", ".join(f"{k}={v}" for k, v in LEVERS[lever].items()) or "fp32, remat none, chunk 32"


def ok(r) -> bool:
  return bool(r) and "error" not in r


def cpu_step(r) -> float:
  """Median CPU seconds (all threads) per step; a steadier cost than wall time on a shared
  machine, where wall time also counts waiting for the cores."""
  return statistics.median(r["cpu_step_times"])


def table(results: dict) -> list[list]:
  out = [["run", "lever", "peak RSS GB", "vs base", "RSS before compile GB", "XLA temp GB",
          "XLA args GB", "step s", "CPU s/step", "CPU vs base", "compile s", "step-1 loss"]]
  for (algo, lever), r in results.items():
    name = f"{lever} (`{describe(lever)}`)"
    if not ok(r):
      out.append([algo, name, f"failed: {r['error']}"] + [""] * 9)
      continue
    base = results.get((algo, "baseline"))
    out.append([
        algo, name, f"{r['rss_gb']:.2f}",
        f"{r['rss_gb'] - base['rss_gb']:+.2f}" if ok(base) else "",
        f"{r['rss_marks']['before_compile']:.2f}", f"{r['xla']['temp']:.2f}",
        f"{r['xla']['argument']:.2f}", f"{r['step_s']:.1f}", f"{cpu_step(r):.1f}",
        f"x{cpu_step(r) / cpu_step(base):.2f}" if ok(base) else "", f"{r['compile_s']:.0f}",
        f"{r['loss']:.4f}"])
  return out


# "What to use when": (levers, what they change); a bullet cites each one's measured effect.
ADVICE = [
    (("remat_full", "remat_dots", "remat_dots_no_batch"),
     "Activations (XLA temp) too big: `model.remat_policy` keeps less of each layer for the "
     "backward pass and recomputes the rest (`full`: only the layer input; `dots`: every matmul "
     "output; `dots_no_batch`: matmul outputs without batch dimensions, so not the [B, H, T, T] "
     "attention scores)"),
    (("accum2", "accum4"),
     "Or split the batch: `grad_accum=k` keeps one microbatch of activations alive plus a "
     "gradient buffer the size of the trainable params; global batch and loss are unchanged"),
    (("lora16",),
     "Weights and optimiser state (XLA args) too big: `lora.rank` trains adapters only, so the "
     "base has no optimiser state and no weight gradient (and DPO's reference is the base itself)"),
    (("bf16",),
     "`model.param_dtype` / `model.dtype` = bfloat16 halve params and optimiser state (master "
     "weights and Adam moments in bf16: a precision risk at small learning rates)"),
    (("precompute_ref",),
     "DPO: `precompute_ref=True` scores every pair with the reference once before training, so "
     "steps skip the reference forward"),
    (("unscanned",),
     "`model.scan_layers=False` unrolls the layer loop: no stacked per-layer buffers (and XLA "
     "schedules across layers) for a longer compile"),
    (("chunk8", "chunk128"),
     "`logprob_chunk_size` sizes the fp32 [B x chunk, vocab] logits block of the loss"),
]


def effect(results: dict, algo: str, lever: str) -> str:
  """'SFT RSS -a GB (temp b -> c[, args d -> e]), CPU xr' against that run's baseline."""
  r, base = results.get((algo, lever)), results.get((algo, "baseline"))
  if not ok(r) or not ok(base):
    return ""
  args = (f", args {base['xla']['argument']:.2f} -> {r['xla']['argument']:.2f}"
          if abs(r["xla"]["argument"] - base["xla"]["argument"]) > 0.01 else "")
  return (f"{algo.upper()} RSS {r['rss_gb'] - base['rss_gb']:+.2f} GB (temp "
          f"{base['xla']['temp']:.2f} -> {r['xla']['temp']:.2f}{args}), CPU "
          f"x{cpu_step(r) / cpu_step(base):.2f}")


def bullet(results: dict, levers, text: str) -> str:
  measured = [f"`{lever}` " + ", ".join(filter(None, (effect(results, a, lever) for a in ALGOS)))
              for lever in levers if any(effect(results, a, lever) for a in ALGOS)]
  return f"- {text}: " + "; ".join(measured) + "." if measured else ""


def findings(results: dict) -> str:
  """What dominates the baselines' memory, the levers that did not do what their name says, and
  the largest single saving."""
  bases = {a: results[a, "baseline"] for a in ALGOS if ok(results.get((a, "baseline")))}
  share = lambda r: r["xla"]["temp"] / (r["xla"]["temp"] + r["xla"]["argument"])
  out = []
  if bases:
    parts = ", ".join(f"{100 * share(r):.0f}% ({a.upper()})" for a, r in bases.items())
    out.append(f"At this shape activations are {parts} of the step's XLA memory" + (
        ", so remat and grad_accum are the levers that matter; LoRA and bf16 matter where weights "
        "dominate (bigger models, shorter rows)." if min(map(share, bases.values())) > 0.5
        else "."))
  for algo, base in bases.items():
    bf16, ref = results.get((algo, "bf16")), results.get((algo, "precompute_ref"))
    if ok(bf16) and bf16["xla"]["temp"] >= base["xla"]["temp"]:
      out.append(
          f"{algo.upper()} bf16 did not shrink activations (temp {base['xla']['temp']:.2f} -> "
          f"{bf16['xla']['temp']:.2f} GB): XLA's CPU backend computes bf16 matmuls and "
          "elementwise ops in f32 (it inserts converts), so only params and optimiser state "
          "halve; on GPU/TPU activations are stored in bf16.")
    if ok(ref):
      unused = base["xla"]["argument"] - ref["xla"]["argument"]
      if unused > 0.01 and base["rss_gb"] - ref["rss_gb"] < unused:
        out.append(
            f"precompute_ref drops the reference from the step ({unused:.2f} GB fewer XLA args) "
            f"but peak RSS moves by only {ref['rss_gb'] - base['rss_gb']:+.2f} GB: the reference "
            "weights stay resident (kept for eval batches and cache misses).")
    saved = [(base["rss_gb"] - r["rss_gb"], lever) for (a, lever), r in results.items()
             if a == algo and lever != "baseline" and ok(r)]
    if saved:
      gb, lever = max(saved)
      out.append(f"{algo.upper()} largest single saving: `{lever}`, {gb:.2f} of "
                 f"{base['rss_gb']:.2f} GB peak RSS.")
  return " ".join(out)


def advice(results: dict) -> str:
  """'What to use when', each claim with its numbers from this run."""
  bullets = [b for b in (bullet(results, *item) for item in ADVICE) if b]
  return "\n".join(["**What to use when** (deltas against each run's baseline).", "",
                    *bullets, "", findings(results)])


def notes(args, results: dict) -> str:
  model = "tiny random Llama (--quick)" if args.quick else "SmolLM2-135M-Instruct"
  shapes = ", ".join(f"{a.upper()} {shape(args, a)[0]} x {shape(args, a)[1]}" for a in ALGOS)
  return (
      f"{model}; {shapes}; {args.steps} steps per row (step 1 compiles), one fresh process per "
      "row. Peak RSS: the row's process high-water mark (load, compile, train); RSS before "
      "compile: resident once model, optimiser state and data are set up. XLA temp / args: the "
      "compiled train step's memory analysis (deterministic). step s: median wall time of steps "
      "2..; CPU s/step: median CPU seconds of all threads, the cost column (CPU vs base), since "
      f"wall times are noisy here: 2 cores shared with other jobs (1-minute load average "
      f"{load_range(results)} at the start of the rows). {versions('jax', 'flax', 'optax')}."
      f"\n\n{advice(results)}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3, help="optimiser steps per row (1 compiles)")
  parser.add_argument("--only", default="", help="comma-separated levers or algo:lever")
  parser.add_argument("--quick", action="store_true", help="tiny random model, B=4 x T=128")
  parser.add_argument("--length", type=int, default=0,
                      help="tokens per row instead of 256 (results/memory_T<length>.md)")
  parser.add_argument("--raw", default="", help="JSON file of raw row results: rows in it are "
                      "reused, new ones added (resume or re-render a run)")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.steps < 2:
    parser.error("--steps must be >= 2 (step 1 compiles; later steps are timed)")
  if args.child:
    return child(args)
  try:
    rows = selected_rows(args.only)
  except ValueError as e:
    parser.error(str(e))
  results = measure(args, rows)
  command = "python benchmarks/memory.py" + "".join(
      f" --{k}={v}" for k, v in (("steps", args.steps), ("only", args.only),
                                 ("length", args.length)) if v)
  title = "Memory levers: peak memory and step time per config lever"
  name = "memory"
  if args.length:
    title, name = f"{title}, T={args.length}", f"memory_T{args.length}"
  write_result(name, title, command + " --quick" * args.quick, table(results),
               notes(args, results), save=not args.quick)


if __name__ == "__main__":
  main()
