"""DPO on HH-RLHF-shaped pairs: prefix-shared vs unshared jaxpost vs TRL DPOTrainer, one run.

    python benchmarks/prefix_sharing.py [--steps=3] [--batch_size=8] [--trl_threads=2]

The pairs are built in code in HH-RLHF's `text` format (chosen / rejected are whole dialogues
"\\n\\nHuman: ...\\n\\nAssistant: ..." that differ in the final assistant turn): multi-turn prompts
of 150-400 tokens and final responses of 20-80 tokens (the drawn lengths are in the notes), so
the prompt dominates as on real preference data. The same rows go through jaxpost's loader
once per layout: unshared ([B, T] chosen rows + [B, T] rejected rows, T = the longest row) and
prefix-shared (`data.prefix_sharing`: B rows `[prompt | chosen | rejected]`, DESIGN "Prefix
sharing"); TRL 1.16's DPOTrainer gets the unshared token ids (its collated batches are asserted
equal to them; its `padding_free` is disabled in 1.16, it falls back to padding). Sigmoid DPO,
beta 0.1, full fine-tune, reference = the initial policy; each framework in its own child process
(peak RSS per framework). tokens/s counts the pairs' real tokens as the unshared layout holds
them (prompt twice), the same numerator for all three rows. Writes
benchmarks/results/prefix_sharing.md.
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

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).parent)]
import common  # noqa: E402
import run  # noqa: E402
import trainers  # noqa: E402

LEARNING_RATE, BETA = 5e-6, 0.1
PROMPT_TOKENS, RESPONSE_TOKENS = (150, 400), (20, 80)
WORDS = ("the a of to and in is it you that for on with as this can be are have not but what "
         "how why when would could should about more some time people make know think good "
         "water garden recipe travel history music science computer story friend money health "
         "question answer because really maybe probably different important something explain "
         "help please thanks sure understand example problem simple usually often world city").split()


def hh_rows(count: int, tokenizer, seed: int = 0) -> list[dict]:
  """`count` HH-RLHF-style text pairs; prompt / response token counts drawn uniformly from
  PROMPT_TOKENS / RESPONSE_TOKENS (counted with the bundled tokenizer, template excluded)."""
  rng = np.random.default_rng(seed)
  text = lambda n: " ".join(rng.choice(WORDS, n)).capitalize() + "."
  tokens = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])
  rows = []
  for _ in range(count):
    target, dialogue = rng.integers(*PROMPT_TOKENS), ""
    while tokens(dialogue) < target - 20:
      dialogue += f"\n\nHuman: {text(rng.integers(8, 40))}\n\nAssistant: {text(rng.integers(8, 60))}"
    dialogue += f"\n\nHuman: {text(rng.integers(5, 15))}\n\nAssistant:"
    response = lambda: " " + text(max(int(rng.integers(*RESPONSE_TOKENS) / 1.3), 5))
    rows.append({"chosen": dialogue + response(), "rejected": dialogue + response()})
  return rows


def layout_batches(rows: list[dict], batch_size: int, steps: int, shared: bool) -> dict:
  """The loader's batches of `rows` (in order), stacked {field: [steps, ...]}; unshared: one
  bucket, the longest row."""
  longest = 2 * (PROMPT_TOKENS[1] + RESPONSE_TOKENS[1])  # room for the chat template
  data = {"train": rows, "prefix_sharing": shared, "cache": False}
  return trainers.loader_batches(data, "preference", longest, batch_size, steps)


def tight(batches: dict) -> dict:
  """`batches` cut to their longest real row (padding the loader's bucket added)."""
  real = max(int(v.sum(-1).max()) for k, v in batches.items() if k.endswith("attention_mask"))
  width = -(-real // 16) * 16
  return {k: v[..., :width] if v.ndim == 3 else v for k, v in batches.items()}


def pair_tokens(unshared: dict) -> float:
  """Real chosen + rejected tokens per step (the prompt counted in both rows)."""
  return trainers.real_tokens_per_step(unshared)


def computed_tokens(batches: dict) -> float:
  """Real tokens the model computes per step in this layout."""
  masks = [v for k, v in batches.items() if k.endswith("attention_mask")]
  return float(sum(m.sum() for m in masks)) / len(masks[0])


# ------------------------------------------------------------------------------ children

def child(spec: dict) -> dict:
  batches = dict(np.load(spec["batches"]))
  if spec["impl"] == "trl":
    return trainers.run_trl("dpo", batches, spec["model_dir"], LEARNING_RATE, spec["threads"],
                            beta=BETA)
  steps, rows, length = batches["input_ids" if spec["shared"] else "chosen_input_ids"].shape
  config = trainers.jaxpost_config(
      "dpo", "", steps, spec["batch_size"], length, LEARNING_RATE,
      {"beta": BETA, "model.name_or_path": spec["model_dir"],
       "data.prefix_sharing": spec["shared"], **spec["overrides"]})
  return trainers.run_jaxpost(config, batches)


def run_child(spec: dict, workdir: Path, label: str) -> dict:
  path = workdir / f"{label}.json"
  path.write_text(json.dumps(spec))
  print(f"{label} ...", flush=True)
  result = common.child_result([sys.executable, __file__, f"--child={path}"], label)
  print(f"{label}: median {statistics.median(result['step_times']):.2f} s, step-1 loss "
        f"{result['check']:.5f}, peak RSS {result['rss_gb']:.2f} GB", flush=True)
  return result


def table_row(label: str, result: dict, tokens: float, computed: float, base: dict) -> list:
  median = statistics.median(result["step_times"])
  ratio = statistics.median(base["step_times"]) / median
  return [label, f"{computed:.0f}", f"{median:.2f}", f"{tokens / median:.1f}",
          f"**{ratio:.2f}x**", f"{result['rss_gb']:.2f}", f"{result['first_step']:.1f}",
          f"{result['check']:.5f}"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3, help="steps per run (the first compiles)")
  parser.add_argument("--batch_size", type=int, default=8, help="pairs per step")
  parser.add_argument("--trl_threads", type=int, default=os.cpu_count(),
                      help="torch threads of the TRL run; 0 skips TRL (e.g. too little memory)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a jaxpost config override for both jaxpost runs (repeatable)")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return common.emit_result({**child(json.loads(Path(args.child).read_text())),
                               "rss_gb": common.peak_rss_gb()})
  from jaxpost.hf import load_tokenizer, resolve_model_dir
  model_dir = str(resolve_model_dir(trainers.MODEL))
  overrides = run.parse_overrides(args.set)
  rows = hh_rows(args.steps * args.batch_size, load_tokenizer(model_dir))
  load = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    layouts = {shared: tight(layout_batches(rows, args.batch_size, args.steps, shared))
               for shared in (False, True)}
    spec = {"model_dir": model_dir, "batch_size": args.batch_size, "threads": args.trl_threads,
            "overrides": overrides}
    results = {}
    runs = (("trl", False, "trl"), ("unshared", False, "jaxpost"), ("shared", True, "jaxpost"))
    for name, shared, impl in runs[0 if args.trl_threads else 1:]:
      np.savez(tmp / f"{name}.npz", **layouts[shared])
      results[name] = run_child({**spec, "impl": impl, "shared": shared,
                                 "batches": str(tmp / f"{name}.npz")}, tmp, name)
  write(args, rows, layouts, results, load)


def trl_note(args) -> str:
  if args.trl_threads:
    return f"TRL with {args.trl_threads} torch threads."
  return "TRL not run in this measurement (--trl_threads=0)."


def write(args, rows, layouts, results, load):
  unshared, shared = layouts[False], layouts[True]
  tokens = pair_tokens(unshared)
  table = [["impl", "computed tokens / step", "median step (s)", "pair tokens/s",
            f"speed-up vs {'TRL' if 'trl' in results else 'unshared'}", "peak RSS (GB)", "compile / first step (s)", "step-1 loss"]]
  base = results.get("trl", results["unshared"])
  for label, name, layout in (("TRL 1.16 DPOTrainer", "trl", unshared),
                              ("jaxpost, unshared", "unshared", unshared),
                              ("jaxpost, prefix-shared", "shared", shared)):
    if name in results:
      table.append(table_row(label, results[name], tokens, computed_tokens(layout), base))
  ratio = statistics.median(results["unshared"]["step_times"]) / statistics.median(
      results["shared"]["step_times"])
  prompt = [int(np.argmax(m > 0)) for m in unshared["chosen_loss_mask"].reshape(
      -1, unshared["chosen_loss_mask"].shape[-1])]
  comps = np.concatenate([unshared[f"{s}_loss_mask"].sum(-1).reshape(-1) + 1
                          for s in ("chosen", "rejected")])
  settings = " ".join(f"--set={item}" for item in args.set)
  common.write_result(
      "prefix_sharing", f"Prefix sharing: DPO on HH-RLHF-shaped pairs, SmolLM2-135M fp32, "
      f"B={args.batch_size} pairs",
      f"python benchmarks/prefix_sharing.py --steps={args.steps} --batch_size={args.batch_size} "
      f"--trl_threads={args.trl_threads} {settings}".strip(), table,
      f"prefix-shared / unshared step time: **{ratio:.2f}x**. {len(rows)} pairs built in code "
      f"in HH-RLHF's text format: templated prompts of {min(prompt)}-{max(prompt)} tokens "
      f"(mean {np.mean(prompt):.0f}), responses of {comps.min()}-{comps.max()} tokens "
      f"(mean {comps.mean():.0f}); unshared batches [{args.batch_size}, "
      f"{unshared['chosen_input_ids'].shape[-1]}] per side (the longest row, as TRL pads), "
      f"prefix-shared [{shared['input_ids'].shape[1]}, {shared['input_ids'].shape[-1]}]. "
      f"Sigmoid DPO, beta {BETA}, full fine-tune, reference = initial policy, AdamW lr "
      f"{LEARNING_RATE}; TRL's collated token ids asserted equal to the unshared batches; "
      f"median over steps 2..{args.steps}; the same step-1 loss in all three rows checks the "
      f"math. pair tokens/s = real chosen + rejected tokens ({tokens:.0f} per step) / step "
      f"time. {trl_note(args)} 1-minute load average {load:.2f} "
      f"before, {os.getloadavg()[0]:.2f} after "
      f"({'shared with other jobs: loose numbers' if load > 2.5 else 'nothing else running'})."
      f" {common.versions('jax', 'torch', 'transformers', 'trl')}.")


if __name__ == "__main__":
  main()
