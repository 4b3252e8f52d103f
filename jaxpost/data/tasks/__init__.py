"""Built-in generated tasks, so every default config runs offline: `builtin:<name>` data sources.

    rows = task_rows("arithmetic", "train", "preference")  # [{"prompt", "chosen", "rejected"}]
    score = reward_fn("arithmetic")(prompts, completions, rows)  # np.float32 [N], 1 = correct

Row kinds (TRL column conventions). Rows are conversational by default (prompt = one user message,
completions = one assistant message), so the data pipeline and `jaxpost.generate` both render them
with the model's chat template; `conversational=False` gives plain strings (no template, as TRL
treats standard rows). Columns:
  "sft"        prompt, completion                 the concise correct answer
  "preference" prompt, chosen, rejected           chosen concise+correct; rejected a mix of wrong,
                                                  rambling, and wrong+rambling
  "ranked"     prompt, responses, scores          k (2-4) responses best first, strictly
                                                  decreasing scores
  "unpaired"   prompt, completion, label          KTO: each question's chosen (True) and rejected
                                                  (False), in a fixed shuffled order
  "prompt"     prompt, answer                     for generation / RL with `reward_fn`
  "onpolicy"   prompt, chosen, rejected, answer,  sampled from the bundled SmolLM2-135M-Instruct
               chosen_reward, rejected_reward     (chosen: a sample the verifier passes, rejected:
                                                  one it fails), shipped as <task>_onpolicy_
                                                  <split>.jsonl; only the prompts with such a pair
The "train" and "eval" splits never share a question; rows are identical on every call and machine.

The "onpolicy" files are the `data.jsonl` of the best-vs-worst pairs pipeline (iterative DPO's
first round: pairs of the initial policy's own samples, Xiong et al. 2024; Pang et al. 2024), run
once with the bundled model on the first 512 "train" prompts and on the first 96 "eval" prompts:

    python scripts/pipeline.py --config=configs/rejection_sampling.py:pairs --config.rounds=1 \
        --config.train_after=False --config.prompts_per_round=512 --config.workdir=onpolicy_train
    python scripts/pipeline.py --config=configs/rejection_sampling.py:pairs --config.rounds=1 \
        --config.train_after=False --config.prompts_per_round=96 --config.workdir=onpolicy_eval \
        --config.data.train=eval_prompts.jsonl   # task_rows("arithmetic", "eval", "prompt")

(8 samples per prompt at temperature 0.8, 16 new tokens; verifier: the final number is right.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from jaxpost.data.tasks import arithmetic

TASKS = ("arithmetic",)
KINDS = ("sft", "preference", "ranked", "unpaired", "prompt", "onpolicy")
SAMPLED_KINDS = ("onpolicy",)  # read from files shipped next to this module, not generated
COMPLETION_COLUMNS = ("completion", "chosen", "rejected")  # one assistant message each


def _check_name(name: str):
  if name not in TASKS:
    raise ValueError(f"unknown built-in task {name!r} (builtin:<name> with name in {TASKS})")


def _question_rng(split: str, index: int) -> np.random.Generator:
  # One generator per question: a question's responses are the same in every kind of row.
  return np.random.default_rng([arithmetic.SEEDS[split], index])


def _row(question: str, rng: np.random.Generator, kind: str, k: int) -> list[dict]:
  prompt = arithmetic.prompt_of(question)
  graded = arithmetic.graded_responses(question, rng)
  best = graded[0][0]
  rejected = graded[1 + rng.integers(3)][0]
  if kind == "sft":
    return [{"prompt": prompt, "completion": best}]
  if kind == "preference":
    return [{"prompt": prompt, "chosen": best, "rejected": rejected}]
  if kind == "ranked":
    return [{"prompt": prompt, "responses": [t for t, _ in graded[:k]],
             "scores": [s for _, s in graded[:k]]}]
  if kind == "unpaired":
    return [{"prompt": prompt, "completion": best, "label": True},
            {"prompt": prompt, "completion": rejected, "label": False}]
  return [{"prompt": prompt, "answer": arithmetic.evaluate(question)}]


def _conversational(row: dict) -> dict:
  out = dict(row)
  out["prompt"] = [{"role": "user", "content": row["prompt"]}]
  for key in COMPLETION_COLUMNS:
    if key in row:
      out[key] = [{"role": "assistant", "content": row[key]}]
  if "responses" in row:
    out["responses"] = [[{"role": "assistant", "content": r}] for r in row["responses"]]
  return out


def task_rows(name: str, split: str, kind: str, k: int = 3,
              conversational: bool = True) -> list[dict]:
  """Rows of built-in task `name` for `split` ("train"/"eval") in format `kind` (see module doc).

  `k` is the number of ranked responses per prompt (kind "ranked" only; 2 <= k <= 4).
  """
  _check_name(name)
  if kind not in KINDS:
    raise ValueError(f"task_rows({name!r}): kind must be one of {KINDS}, got {kind!r}")
  if not 2 <= k <= 4:
    raise ValueError(f"task_rows({name!r}): ranked k must be in [2, 4], got {k}")
  if kind in SAMPLED_KINDS:
    rows = _sampled_rows(name, split, kind)
    return rows if conversational else [_plain(r) for r in rows]
  rows = []
  for i, q in enumerate(arithmetic.questions(split)):
    rows.extend(_row(q, _question_rng(split, i), kind, k))
  if kind == "unpaired":
    order = np.random.default_rng(arithmetic.SEEDS[split]).permutation(len(rows))
    rows = [rows[i] for i in order]
  return [_conversational(r) for r in rows] if conversational else rows


def _sampled_rows(name: str, split: str, kind: str) -> list[dict]:
  """The shipped rows of a sampled kind (module docstring), conversational as written."""
  if split not in arithmetic.SEEDS:
    raise ValueError(f"task_rows({name!r}): split must be 'train' or 'eval', got {split!r}")
  path = Path(__file__).with_name(f"{name}_{kind}_{split}.jsonl")
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(row: dict) -> dict:
  """The inverse of `_conversational`: message lists replaced by their content."""
  out = dict(row, prompt=_text(row["prompt"], "user"))
  out.update({k: _text(row[k], "assistant") for k in COMPLETION_COLUMNS if k in row})
  return out


def _text(value, role: str) -> str:
  """A plain string, or the content of the last `role` message of a conversational value."""
  if isinstance(value, str):
    return value
  found = [m["content"] for m in value if m.get("role") == role]
  if not found:
    raise ValueError(f"reward: conversational value has no {role} message: {value!r}")
  return found[-1]


def reward_fn(name: str, format_weight: float = 0.0) -> Callable[..., np.ndarray]:
  """A verifier for task `name`: `fn(prompts, completions, rows=None) -> np.float32 [N]`.

  Score = 1 if the completion's final number is the exact answer else 0, plus `format_weight`
  if the completion is just the number. The answer comes from `rows[i]["answer"]` when given,
  otherwise it is recomputed from the prompt text. Prompts and completions may be plain strings or
  conversational (the last user / assistant message counts).
  """
  _check_name(name)

  def score(prompts: Sequence, completions: Sequence[str], rows: Sequence[dict] | None = None):
    if len(prompts) != len(completions):
      raise ValueError(f"reward {name}: {len(prompts)} prompts vs {len(completions)} completions")
    out = np.zeros(len(completions), np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
      answer = rows[i]["answer"] if rows and "answer" in rows[i] else arithmetic.evaluate(
          _text(p, "user"))
      c = _text(c, "assistant")
      out[i] = float(arithmetic.extract_answer(c) == int(answer))
      out[i] += format_weight * arithmetic.is_concise(c)
    return out

  return score


__all__ = ["TASKS", "KINDS", "task_rows", "reward_fn"]
