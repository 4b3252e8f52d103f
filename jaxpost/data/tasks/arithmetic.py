"""A generated, verifiable arithmetic task: "What is 37 + 48? Answer with just the number."

Questions are drawn by a seeded generator from four families small enough for a 135M chat model:
two-digit addition, subtraction with a non-negative result, times tables up to 12, and a two-step
`a + b - c`. Every question is checked by recomputing it from the prompt text, so a completion can
be scored without any stored label (`check`).

The held-out split is fixed by a hash of the question text (`_is_eval`), so no question can ever
appear in both splits, whatever the sizes or seed. Completions come in two styles: concise (just
the number, what the instruction asks for) and rambling (a wordy walk-through ending in a number);
each style comes with the right answer or a plausible wrong one (off by one or ten, or the result
of the wrong operation). The quality order used for preference and ranked rows is

    correct+concise > correct+rambling > wrong+concise > wrong+rambling

which is exactly the order of `score = correct + 0.5 * concise` (the reward with format weight 0.5).
"""

from __future__ import annotations

import functools
import re
import zlib

import numpy as np

INSTRUCTION = "Answer with just the number."
TRAIN_SIZE = 3000
EVAL_SIZE = 200
EVAL_FRACTION = 10   # one question in EVAL_FRACTION (by hash) belongs to the held-out split
FORMAT_WEIGHT = 0.5  # bonus for a concise answer in the ranked-row scores

_QUESTION = re.compile(r"What is (\d+) ([+\-*]) (\d+)(?: ([+\-]) (\d+))?\?")
_NUMBER = re.compile(r"-?\d[\d,]*")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
SEEDS = {"train": 1234, "eval": 5678}

_RAMBLE = (
    "Let me think about this carefully. We need to work out {expr}. I will go step by step and "
    "double-check each part of the calculation before giving the result. So the answer is {value}.",
    "Okay, so the question asks about {expr}. Arithmetic like this is easy to get wrong when you "
    "rush, so let me take my time here. After working it through, I get {value}.",
    "Good question! To find {expr} we can break the numbers into tens and ones, combine them, and "
    "then put everything back together. Doing that gives us a final result of {value}.",
)


def _is_eval(question: str) -> bool:
  return zlib.crc32(question.encode()) % EVAL_FRACTION == 0


def _draw_question(rng: np.random.Generator) -> str:
  family = rng.integers(4)
  if family == 0:
    a, b = rng.integers(1, 100, size=2)
    return f"What is {a} + {b}?"
  if family == 1:
    a, b = sorted(rng.integers(1, 100, size=2), reverse=True)
    return f"What is {a} - {b}?"
  if family == 2:
    a, b = rng.integers(2, 13, size=2)
    return f"What is {a} * {b}?"
  a, b, c = rng.integers(1, 30, size=3)
  return f"What is {a} + {b} - {c}?" if a + b >= c else f"What is {c} + {b} - {a}?"


def evaluate(question: str) -> int:
  """The exact answer of a question produced by this task (parsed back from its text)."""
  m = _QUESTION.search(question)
  if m is None:
    raise ValueError(f"arithmetic task: cannot parse a question in {question!r}")
  value = _OPS[m[2]](int(m[1]), int(m[3]))
  return _OPS[m[4]](value, int(m[5])) if m[4] else value


def _wrong_answer(question: str, rng: np.random.Generator) -> int:
  """A plausible mistake: off by 1, 2 or 10, or the last operation swapped; never the answer."""
  right = evaluate(question)
  swap = {"+": "-", "-": "+", "*": "+"}
  last = max(question.rfind(f" {op} ") for op in swap)
  slipped = evaluate(question[:last + 1] + swap[question[last + 1]] + question[last + 2:])
  candidates = [right + 1, right - 1, right + 2, right + 10, right - 10, slipped]
  candidates = [c for c in candidates if c != right and c >= 0]
  return int(candidates[rng.integers(len(candidates))])


@functools.lru_cache(maxsize=4)
def questions(split: str) -> tuple[str, ...]:
  """The split's questions: unique, in a fixed order, all on the split's side of the hash."""
  if split not in SEEDS:
    raise ValueError(f"arithmetic task: split must be 'train' or 'eval', got {split!r}")
  size = TRAIN_SIZE if split == "train" else EVAL_SIZE
  rng = np.random.default_rng(SEEDS[split])
  seen: dict[str, None] = {}
  while len(seen) < size:
    q = _draw_question(rng)
    if _is_eval(q) == (split == "eval"):
      seen.setdefault(q, None)
  return tuple(seen)


def prompt_of(question: str) -> str:
  return f"{question} {INSTRUCTION}"


def completion(question: str, value: int, concise: bool, rng: np.random.Generator) -> str:
  """The text of an answer `value` to `question`, concise or rambling."""
  if concise:
    return str(value)
  expr = question[len("What is "):-1]
  return _RAMBLE[rng.integers(len(_RAMBLE))].format(expr=expr, value=value)


def graded_responses(question: str, rng: np.random.Generator) -> list[tuple[str, float]]:
  """The four (text, score) responses to a question, best first (see the module docstring)."""
  right, wrong = evaluate(question), _wrong_answer(question, rng)
  out = []
  for value, correct in ((right, 1.0), (wrong, 0.0)):
    for concise in (True, False):
      out.append((completion(question, value, concise, rng), correct + FORMAT_WEIGHT * concise))
  return out


def extract_answer(text: str) -> int | None:
  """The last integer in a completion ("... so the answer is 1,234." -> 1234), or None."""
  found = _NUMBER.findall(text)
  if not found:
    return None
  return int(found[-1].replace(",", ""))


def is_concise(text: str) -> bool:
  """True when the completion is just an integer (what the instruction asks for)."""
  return re.fullmatch(r"\s*-?\d[\d,]*\.?\s*", text) is not None


def check(prompt: str, text: str) -> bool:
  """True when the completion's final number is the exact answer to the prompt's question."""
  return extract_answer(text) == evaluate(prompt)
