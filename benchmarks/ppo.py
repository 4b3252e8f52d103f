"""PPO speed: one iteration of jaxpost vs TRL's experimental PPOTrainer, SmolLM2-135M fp32.

    pip install --no-deps --target /tmp/trl_ppo_site "trl==1.0.0" accelerate  # not the project env
    PYTHONPATH=/tmp/trl_ppo_site python benchmarks/ppo.py [--steps=2] [--prompts=8]
        [--new_tokens=32] [--grad_accum=1] [--torch_threads=N]

TRL 1.16 no longer ships `trl.experimental.ppo`; 1.0.0 is the last release that has it.

One PPO iteration (Ziegler et al. 2019; Ouyang et al. 2022) = rollout (one sampled completion
of up to N new tokens for each of P prompts, scored by the reward model) + update (reference
log-probs, values, per-token rewards, GAE, then 4 epochs x 1 minibatch of the clipped surrogate
+ clipped value loss, in `--grad_accum` microbatches each). Every model is the bundled
SmolLM2-135M-Instruct in fp32: the policy and the reference as causal LMs, the reward model and
the critic as that model with a scalar score head (jaxpost's N(0, 0.02²) head, seed 0, saved
once as an HF LlamaForSequenceClassification dir and loaded by both sides). Prompts: the first
P-prompt batches of jaxpost's loader over the built-in arithmetic task (shuffle off, the chat
template), handed to TRL as token ids in the same order. The recipe's PPO keys on both sides
(TRL's defaults): k1 KL, kl_coef 0.05, γ 1, λ 0.95, ε 0.2, ε_v 0.2, vf_coef 0.1, no whitening
of rewards, no EOS penalty; temperature 0.7, stop at EOS; AdamW at one learning rate for policy
and critic, gradient clipping at norm 1.

  jaxpost  `jaxpost.configs.get("ppo")` through `jaxpost.train` (log_every 1): step_time,
           time/rollout (sampling + the reward model's scores, one jit) and time/update (the
           rest, one jit) from metrics.jsonl; once more with critic.share_backbone=True
           (the critic a score head on the policy's trunk: one trunk instead of two)
  TRL      trl.experimental.ppo.PPOTrainer, per_device_train_batch_size = P / grad_accum,
           gradient_accumulation_steps = grad_accum, num_mini_batches 1, num_ppo_epochs 4,
           local_rollout_forward_batch_size P (one generate call); whole step = between two
           on_step_end callbacks; rollout = `batch_generation` + the reward model's
           `get_reward` calls; update = whole - rollout. Its dataloader is replaced by an
           unshuffled one, and its queries are asserted equal to jaxpost's prompt ids.

`--steps` iterations are timed after one warm-up iteration (jaxpost: XLA compilation) and the
median reported. Each side runs in its own child process (peak RSS per framework); writes
benchmarks/results/ppo.md.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import common  # noqa: E402
import grpo  # noqa: E402

SHARED_CRITIC = {"critic.share_backbone": True}  # the third row: value head on the policy trunk
LEARNING_RATE = 3e-6  # TRL PPOConfig's default, for the policy and the critic
TEMPERATURE = 0.7  # the recipe's rollout.temperature and TRL PPOConfig's default
EPOCHS = 4
PPO_KEYS = {"kl_coef": 0.05, "kl_estimator": "k1", "gamma": 1.0, "lam": 0.95, "cliprange": 0.2,
            "cliprange_value": 0.2, "vf_coef": 0.1, "whiten_rewards": False}


# ------------------------------------------------------------------------------ jaxpost

def jaxpost_config(spec: dict, workdir: str):
  """jaxpost's "ppo" recipe on the spec's shape (`grpo.timed_run_keys`) against the saved
  score model as reward model and critic."""
  import jaxpost.configs
  c = jaxpost.configs.get("ppo")
  c.update_from_flattened_dict({
      **grpo.timed_run_keys(spec, workdir, LEARNING_RATE), "grad_accum": spec["grad_accum"],
      "ppo.num_generations": 1, "ppo.num_epochs": EPOCHS, "ppo.num_minibatches": 1,
      **{f"ppo.{k}": v for k, v in PPO_KEYS.items()}, "rollout.temperature": TEMPERATURE,
      "reward.model": spec["score_dir"], "reward.funcs": "", "critic.name_or_path": "",
      "critic.optimizer.learning_rate": LEARNING_RATE, "critic.optimizer.max_grad_norm": 1.0,
      **spec.get("overrides", {})})
  return c


def run_jaxpost(spec: dict) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    result, records = grpo.train_timed(jaxpost_config(spec, workdir))
  return {**result, "reward": grpo.mean_of(records, "objective/scores"),
          "kl": grpo.mean_of(records, "objective/kl")}


# ------------------------------------------------------------------------------ TRL

def timed_trainer(spec: dict, marks: dict):
  """A PPOTrainer on the spec's prompts whose generation and reward-model calls add their
  seconds to marks["rollout"][-1] (one entry per iteration, opened at each generation) and
  record the queries in marks["queries"]; its dataloader yields the rows in order."""
  import datasets
  import torch
  import transformers
  from torch.utils.data import DataLoader
  from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

  def timed(fn, opens: bool):
    def wrapper(model, queries, *args, **kwargs):
      start = time.perf_counter()
      out = fn(model, queries, *args, **kwargs)
      if opens:
        marks["rollout"].append(0.0)
        marks["queries"].append(queries.numpy())
      if opens or model is reward_model:
        marks["rollout"][-1] += time.perf_counter() - start
      return out
    return wrapper

  ppo_trainer.batch_generation = timed(ppo_trainer.batch_generation, opens=True)
  ppo_trainer.get_reward = timed(ppo_trainer.get_reward, opens=False)
  tok = transformers.AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
  lm = lambda: transformers.AutoModelForCausalLM.from_pretrained(spec["model_dir"],
                                                                 dtype=torch.float32)
  scorer = lambda: transformers.AutoModelForSequenceClassification.from_pretrained(
      spec["score_dir"], dtype=torch.float32, num_labels=1)
  reward_model = scorer()
  P = spec["batch_size"]
  args = PPOConfig(
      output_dir=spec["out"], per_device_train_batch_size=P // spec["grad_accum"],
      gradient_accumulation_steps=spec["grad_accum"], num_mini_batches=1,
      num_ppo_epochs=EPOCHS, local_rollout_forward_batch_size=P,
      total_episodes=P * spec["steps"], response_length=spec["new_tokens"], stop_token="eos",
      temperature=TEMPERATURE, learning_rate=LEARNING_RATE, lr_scheduler_type="cosine",
      warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, num_sample_generations=0,
      logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
      **PPO_KEYS)
  dataset = datasets.Dataset.from_list([{"input_ids": r["prompt_ids"]} for r in spec["rows"]])
  trainer = PPOTrainer(args=args, processing_class=tok, model=lm(), ref_model=lm(),
                       reward_model=reward_model, value_model=scorer(), train_dataset=dataset,
                       callbacks=[step_ends(marks["ends"])])
  trainer.dataloader = DataLoader(dataset, batch_size=P, shuffle=False,
                                  collate_fn=trainer.data_collator, drop_last=True)
  return trainer, tok


def step_ends(stamps: list):
  """A TrainerCallback appending perf_counter() at train begin and at every step end."""
  import transformers

  class StepEnds(transformers.TrainerCallback):
    def on_train_begin(self, *_, **__):
      stamps.append(time.perf_counter())

    def on_step_end(self, *_, **__):
      stamps.append(time.perf_counter())

  return StepEnds()


def run_trl(spec: dict) -> dict:
  import torch
  torch.set_num_threads(spec["threads"])
  marks = {"rollout": [], "queries": [], "ends": []}
  with tempfile.TemporaryDirectory() as out:
    trainer, tok = timed_trainer({**spec, "out": out}, marks)
    trainer.train()
  check_queries(spec, marks["queries"], tok.pad_token_id)
  steps = [b - a for a, b in zip(marks["ends"], marks["ends"][1:])]
  logs = [r for r in trainer.state.log_history if "objective/scores" in r][1:]
  return {"step_times": steps[1:], "rollout_times": marks["rollout"][1:],
          "update_times": [s - r for s, r in zip(steps[1:], marks["rollout"][1:])],
          "first_step": steps[0], "reward": statistics.mean(r["objective/scores"] for r in logs),
          "kl": statistics.mean(r["objective/kl"] for r in logs),
          "completion_length": None}


def check_queries(spec: dict, queries: list, pad_id: int):
  """Raises unless TRL's query ids (left padding stripped) are jaxpost's prompt ids, in order."""
  seen = []
  for ids in queries:
    real = (ids != pad_id).cumsum(axis=1) > 0  # from the first non-pad token on
    seen.append((ids, real.astype(int)))
  grpo.check_prompts({**spec, "generations": 1}, seen)


# ------------------------------------------------------------------------------ parent

def child(spec_file: str):
  spec = json.loads(Path(spec_file).read_text())
  result = run_jaxpost(spec) if spec["impl"] == "jaxpost" else run_trl(spec)
  common.emit_result({**result, "rss_gb": common.peak_rss_gb()})


def run_side(spec: dict, impl: str, tmp: Path, overrides: dict | None = None) -> dict:
  """One side in its own child process; jaxpost with the config `overrides`."""
  label = f"ppo {impl}" + "".join(f" {k}={v}" for k, v in (overrides or {}).items())
  path = tmp / f"ppo_{impl}.json"
  path.write_text(json.dumps({**spec, "impl": impl, "overrides": overrides or {}}))
  print(f"{label} ...", flush=True)
  result = common.child_result([sys.executable, __file__, f"--child={path}"], label, ROOT)
  print(f"{label}: median {statistics.median(result['step_times']):.2f} s", flush=True)
  return result


def main():
  import run
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2, help="timed iterations after the first")
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--grad_accum", type=int, default=1, help="microbatches per minibatch")
  parser.add_argument("--torch_threads", type=int, default=os.cpu_count())
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args.child)
  if args.prompts % args.grad_accum:
    parser.error(f"--prompts={args.prompts} must be a multiple of --grad_accum={args.grad_accum}")
  from jaxpost.hf import resolve_model_dir
  load = os.getloadavg()[0]
  steps = args.steps + 1
  with tempfile.TemporaryDirectory() as tmp:
    spec = {"steps": steps, "batch_size": args.prompts, "generations": 1,
            "new_tokens": args.new_tokens, "grad_accum": args.grad_accum,
            "threads": args.torch_threads, "rows": grpo.prompt_rows(args.prompts, steps),
            "model_dir": str(resolve_model_dir(grpo.MODEL)),
            "score_dir": run.score_model_dir(Path(tmp))}
    ours, ref = (run_side(spec, impl, Path(tmp)) for impl in ("jaxpost", "trl"))
    shared = run_side(spec, "jaxpost", Path(tmp), SHARED_CRITIC)
  ratio = grpo.speedup_text(ours, ref)
  header = [c if c != "mean reward" else "mean score" for c in grpo.HEADER]
  table = [header, grpo.table_row("jaxpost", spec, ours, ratio),
           grpo.table_row("jaxpost, critic.share_backbone=True", spec, shared,
                          grpo.speedup_text(shared, ref)),
           grpo.table_row("TRL PPOTrainer (1.0.0)", spec, ref, "1.00x")]
  common.write_result(
      "ppo", "PPO: one iteration, jaxpost vs TRL experimental PPOTrainer, SmolLM2-135M fp32",
      f"PYTHONPATH=/tmp/trl_ppo_site python benchmarks/ppo.py --steps={args.steps} "
      f"--prompts={args.prompts} --new_tokens={args.new_tokens} --grad_accum={args.grad_accum} "
      f"--torch_threads={args.torch_threads}", table, notes(args, ours, ref, ratio, load))


def notes(args, ours: dict, ref: dict, ratio: str, load: float) -> str:
  keys = ", ".join(f"{k} {v}" for k, v in PPO_KEYS.items())
  return " ".join([
      f"jaxpost / TRL whole-step time: {ratio} (target >= 2x).",
      f"{args.prompts} prompts of the built-in arithmetic task per iteration (jaxpost's prompt",
      "loader, shuffle off, the model's chat template; TRL's query ids asserted equal), one",
      f"completion each (temperature {TEMPERATURE}, up to {args.new_tokens} new tokens, stop at",
      "EOS). Policy, reference, reward model and critic are all SmolLM2-135M-Instruct (the last",
      "two with the same saved score head), fp32. Update:",
      f"{EPOCHS} epochs x 1 minibatch of {args.prompts} rows in {args.grad_accum} microbatches;",
      f"{keys}; AdamW lr {LEARNING_RATE:g} for policy and critic, clipping at norm 1.",
      "Rollout: sampling + the reward model's scores (TRL: its generate call and its reward",
      "model's forwards; jaxpost: the sampling jit, which scores in-graph); both take pi_old",
      "from the sampler's fp32 log-probs (no top-k/top-p, so no recompute forward);",
      "update: the reference and critic forwards, GAE and the PPO epochs.",
      "jaxpost runs the recipe's unrolled layers (model.scan_layers=False) with",
      "keep_freed_memory (jaxpost.train's default: one glibc malloc arena that keeps freed",
      "memory, so a step does not page-fault its buffers again). A profile of its",
      "update on this CPU: about 60% of the time in matmuls, the rest in elementwise passes",
      "(activations, AdamW; with --grad_accum > 1 the accumulation too). The",
      "critic.share_backbone=True row",
      "(configs/ppo.py:shared_critic, a different critic: a score head on the policy's trunk,",
      "so one trunk forward and backward instead of two) shows the lever that halves it.",
      "Mean score: the reward model's",
      "objective/scores over the timed iterations (the score head is untrained, so it only",
      "shows that both sides score). TRL reports no completion lengths. Median of",
      f"{args.steps} timed iterations after the first (jaxpost: XLA compilation; TRL: eager",
      f"warm-up). Mean objective/kl: jaxpost {fmt(ours['kl'])}, TRL {fmt(ref['kl'])}. TRL ran",
      f"with torch.set_num_threads({args.torch_threads}); XLA uses its default thread pool.",
      "Peak RSS is each child process's maximum resident set. 1-minute load average",
      f"{load:.2f} before, {os.getloadavg()[0]:.2f} after (2 cores).",
      common.versions("jax", "flax", "optax", "torch", "transformers", "trl", "accelerate") + "."])


def fmt(value) -> str:
  return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
  main()
