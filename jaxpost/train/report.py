"""Before/after reports: held-out task accuracy from greedy generation, and the printed table.

When a task evaluator (jaxpost/train/evals.py; by default `config.report.task`) names a built-in
task (jaxpost/data/tasks; "auto": the one data.train is drawn from, jaxpost/data/heldout.py), the
loop generates greedy answers for the first `report.examples` held-out ("eval") prompts before
training and after it, and scores them with the task's verifier:

    task/accuracy = mean 1[final number is right]      task/concise = mean 1[answer is just it]
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

log = logging.getLogger("jaxpost.train")

HEADLINE = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/accuracy",
            "eval/reward", "eval/kl", "task/accuracy", "task/concise")


def task_report(policy, params, config) -> dict:
  """Greedy held-out accuracy of `params` (a LoadedModel's module/tokenizer) on report.task."""
  from jaxpost.data.heldout import report_task
  task = report_task(config)
  if not task or policy.head != "lm":
    return {}
  return task_accuracy(policy, params, task, config.report.examples,
                       config.report.max_new_tokens)


def task_accuracy(policy, params, task: str, examples: int, max_new_tokens: int) -> dict:
  """task/accuracy and task/concise of greedy answers to the first `examples` held-out prompts
  of built-in `task` (module docstring)."""
  from jaxpost.data.tasks import reward_fn, task_rows
  from jaxpost.generate import generate
  rows = task_rows(task, "eval", "prompt")[:examples]
  prompts = [r["prompt"] for r in rows]
  log.info("task report: greedy answers to %d held-out %r prompts (up to %d new tokens)...",
           len(prompts), task, max_new_tokens)
  start = time.perf_counter()
  out = generate(dataclasses.replace(policy, params=params), prompts,
                 max_new_tokens=max_new_tokens)
  correct = reward_fn(task)(prompts, out.texts, rows)
  concise = reward_fn(task, format_weight=1.0)(prompts, out.texts, rows) - correct
  log.info("task report: accuracy %.3f on %d prompts in %.1fs", float(np.mean(correct)),
           len(prompts), time.perf_counter() - start)
  return {"task/accuracy": float(np.mean(correct)), "task/concise": float(np.mean(concise))}


def format_report(before: dict, after: dict, step: int) -> str:
  """A small table of the headline metrics present both before (step 0) and after."""
  keys = [k for k in HEADLINE if k in before and k in after]
  if not keys:
    return ""
  width = max(len(k) for k in keys)
  lines = [f"{'metric':<{width}}  {'step 0':>9}  {'step ' + str(step):>9}"]
  lines += [f"{k:<{width}}  {before[k]:>9.4f}  {after[k]:>9.4f}" for k in keys]
  return "\n".join(lines)


def before_after(before: dict, after: dict, step: int, eval_description: str) -> str:
  """What a run prints at the end: the before/after table, or why there is none."""
  table = format_report(before, after, step)
  if not table:
    return f"No before/after table: {eval_description}"
  return f"Before/after training (eval: {eval_description}):\n{table}"
