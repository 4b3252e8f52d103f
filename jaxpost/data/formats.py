"""Row formats -> normalised examples (TRL's dataset conventions plus Alpaca, ShareGPT, ranked).

Accepted rows (column names configurable through `columns`, canonical name -> dataset column):

    text                              language modelling text
    messages | conversations          a conversation ({"role","content"} or ShareGPT {"from","value"})
    prompt + completion               completion-only SFT
    instruction (+ input) + output    Alpaca (becomes a one-turn conversation)
    prompt + chosen + rejected        explicit preference pair (+ margin: TRL's reward margin)
    chosen + rejected                 implicit prompt: the common prefix (HH-RLHF "\\n\\nHuman: ..."
                                      text is parsed into messages first)
    prompt + responses (+ scores)     ranked responses -> all C(k, 2) pairs, best first
    prompt + completion + label       unpaired (KTO) feedback
    prompt                            prompt only (RL / generation)

Values are plain strings ("standard") or lists of messages ("conversational"). `normalize_row`
turns one row into the examples a training kind consumes:

    sft         {"messages"} | {"prompt", "completion"} | {"text"}
    preference  {"prompt", "chosen", "rejected", "margin"}   (margin: the row's `margin` column,
                                                             the score difference of ranked
                                                             rows, else None)
    unpaired    {"prompt", "completion", "label"}            (label 1 desirable, 0 undesirable)
    prompt      the row's columns with "prompt" normalised   (so rewards can read e.g. "answer")

Empty responses. A response that is compared or labelled (preference chosen/rejected, ranked
responses, unpaired completions) may be empty, as TRL keeps it: its tokens are the end of the turn
(HH-RLHF has such final assistant turns). A demonstration to imitate (an SFT completion, the last
assistant turn of an SFT conversation, SFT text) must not be empty ("empty_completion").

Bad rows raise `DataError` naming source, row index, column and a short `reason` that the loader
counts when `drop_bad_rows` is set.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any, Mapping, Optional, Sequence

KINDS = ("sft", "preference", "unpaired", "prompt")
ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant",
                "function": "tool", "observation": "tool"}
# Format name -> required canonical columns, in detection order (most specific first).
FORMATS = {
    "ranked": ("prompt", "responses"),
    "preference": ("prompt", "chosen", "rejected"),
    "implicit_preference": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction",),
    "text": ("text",),
    "prompt": ("prompt",),
}
KIND_FORMATS = {
    "sft": ("preference", "implicit_preference", "prompt_completion", "messages", "sharegpt",
            "alpaca", "text"),
    "preference": ("ranked", "preference", "implicit_preference"),
    "unpaired": ("unpaired", "preference", "implicit_preference"),
    "prompt": ("ranked", "preference", "unpaired", "prompt_completion", "messages", "sharegpt",
               "alpaca", "prompt"),
}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class DataError(ValueError):
  """A bad row: `reason` is a short key (counted when dropping), the message says what and where."""

  def __init__(self, reason: str, message: str, column: Optional[str] = None):
    super().__init__(message)
    self.reason, self.message, self.column = reason, message, column
    self.source, self.index, self.unit = None, None, "row"

  def at(self, source: str, index: Optional[int], unit: str = "row") -> "DataError":
    """Places the error: `source unit index` ("a.jsonl line 3"); index None: the whole source."""
    self.source, self.index, self.unit = source, index, unit
    return self

  def __str__(self):
    if self.source is None:
      where = "row"
    else:
      where = self.source if self.index is None else f"{self.source} {self.unit} {self.index}"
    col = f", column {self.column!r}" if self.column else ""
    return f"{where}{col}: {self.message} [{self.reason}]"


def normalize_row(row: Mapping[str, Any], kind: str, columns: Optional[Mapping[str, str]] = None,
                  source: str = "<rows>", index: int = 0, unit: str = "row") -> list[dict]:
  """Examples of `kind` from one dataset row; raises DataError(...).at(source, index, unit)."""
  if kind not in KINDS:
    raise ValueError(f"Unknown data kind {kind!r}; choose one of {KINDS}")
  try:
    if not isinstance(row, Mapping):
      raise DataError("bad_row", f"expected a dict-like row, found {type(row).__name__}")
    canon = _rename(row, columns or {})
    fmt = detect_format(canon, kind)
    return _CONVERT[kind](fmt, canon, row, columns or {})
  except DataError as e:
    raise e.at(source, index, unit)


def detect_format(row: Mapping[str, Any], kind: str) -> str:
  """The first format of `kind` whose columns are all present (not None) in `row`."""
  present = {k for k, v in row.items() if v is not None}
  for fmt in KIND_FORMATS[kind]:
    if set(FORMATS[fmt]) <= present:
      return fmt
  expected = " | ".join("+".join(FORMATS[f]) for f in KIND_FORMATS[kind])
  raise DataError("missing_columns", f"found columns {sorted(present)}; kind {kind!r} expects "
                  f"one of: {expected} (rename with data.columns)")


def _rename(row: Mapping[str, Any], columns: Mapping[str, str]) -> dict:
  out = dict(row)
  for canonical, actual in columns.items():
    if canonical not in ("role", "content") and actual in row:
      out[canonical] = row[actual]
  return out


# ---------------------------------------------------------------- values and messages


def _messages(value, column: str, columns: Mapping[str, str]) -> list[dict]:
  """Validated [{"role", "content"}] (ShareGPT "from"/"value" and role aliases mapped)."""
  role_key, content_key = columns.get("role", "role"), columns.get("content", "content")
  out = []
  for i, m in enumerate(value):
    if not isinstance(m, Mapping):
      raise DataError("bad_message", f"message {i} is a {type(m).__name__}, expected a dict with "
                      "'role' and 'content'", column)
    role = m.get(role_key, m.get("from"))
    content = m.get(content_key, m.get("value"))
    role = ROLE_ALIASES.get(role, role)
    if role not in ROLES:
      raise DataError("bad_role", f"message {i} has role {role!r}; expected one of {ROLES} "
                      f"(found keys {sorted(m)})", column)
    if not isinstance(content, str):
      raise DataError("bad_content", f"message {i} ({role}) content is "
                      f"{type(content).__name__}, expected str", column)
    extra = {k: v for k, v in m.items() if k not in (role_key, content_key, "from", "value")}
    out.append({**extra, "role": role, "content": content})
  return out


def _value(row: Mapping[str, Any], column: str, columns: Mapping[str, str]):
  """A standard (str) or conversational (message list) value."""
  value = row[column]
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple)):
    return _messages(value, column, columns)
  raise DataError("bad_type", f"found {type(value).__name__}, expected a string or a list of "
                  "{role, content} messages", column)


def _same_style(cols: Sequence[str], values: Sequence[Any]):
  styles = {isinstance(v, str) for v in values}
  if len(styles) > 1:
    kinds = {c: "string" if isinstance(v, str) else "messages" for c, v in zip(cols, values)}
    raise DataError("mixed_formats", f"columns mix standard and conversational values: {kinds}")


def _nonempty(value, column: str):
  text = value if isinstance(value, str) else "".join(m["content"] for m in value)
  if not text.strip():
    raise DataError("empty_completion", "is empty", column)
  return value


def _prompt_completion(row, columns, imitated: bool):
  """(prompt, completion); an imitated (SFT) completion must not be empty."""
  prompt, completion = _value(row, "prompt", columns), _value(row, "completion", columns)
  _same_style(("prompt", "completion"), (prompt, completion))
  return prompt, _nonempty(completion, "completion") if imitated else completion


def _margin(row) -> Optional[float]:
  """The row's `margin` column (TRL's RewardTrainer: loss -log σ(r_c - r_r - margin)) or None;
  a number, or a string holding one (CSV files hold strings)."""
  value = row.get("margin")
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  number = None
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    number = float(value)
  elif isinstance(value, str):
    try:
      number = float(value)
    except ValueError:
      pass
  if number is None or not math.isfinite(number):
    raise DataError("bad_margin", f"found {value!r}, expected a finite number", "margin")
  return number


# ---------------------------------------------------------------- pairs


def parse_hh(text: str) -> Optional[list[dict]]:
  """'\\n\\nHuman: a\\n\\nAssistant: b' -> [user a, assistant b]; None if not in that form."""
  parts = _HH_TURN.split(text)
  if len(parts) < 3 or parts[0].strip():
    return None
  roles = {"Human": "user", "Assistant": "assistant"}
  return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def extract_prompt(chosen, rejected):
  """Common prefix of chosen and rejected -> (prompt, chosen, rejected), as TRL's extract_prompt
  (for strings a space before the split point stays with the completions)."""
  n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
           min(len(chosen), len(rejected)))
  if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
    n -= 1
  if n == 0:
    raise DataError("no_common_prompt", "chosen and rejected share no prompt prefix", "chosen")
  return chosen[:n], chosen[n:], rejected[n:]


def _pair(fmt, row, columns) -> dict:
  chosen, rejected = _value(row, "chosen", columns), _value(row, "rejected", columns)
  if fmt == "preference":
    prompt = _value(row, "prompt", columns)
  else:
    if isinstance(chosen, str) and isinstance(rejected, str):
      hh = parse_hh(chosen), parse_hh(rejected)
      if hh[0] is not None and hh[1] is not None:
        chosen, rejected = hh
    _same_style(("chosen", "rejected"), (chosen, rejected))
    if chosen == rejected:
      raise DataError("identical_pair", "chosen and rejected are identical", "rejected")
    prompt, chosen, rejected = extract_prompt(chosen, rejected)
  _same_style(("prompt", "chosen", "rejected"), (prompt, chosen, rejected))
  if chosen == rejected:
    raise DataError("identical_pair", "chosen and rejected are identical", "rejected")
  return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": _margin(row)}


def ranked_pairs(row, columns) -> list[dict]:
  """All C(k, 2) (better, worse) pairs of `responses` (best first, or ordered by `scores`
  descending with margin = score difference; tied scores make no pair)."""
  prompt, responses = _value(row, "prompt", columns), row["responses"]
  if not isinstance(responses, (list, tuple)) or len(responses) < 2:
    raise DataError("too_few_responses", "expected a list of at least 2 responses", "responses")
  responses = [_value({"responses": r}, "responses", columns) for r in responses]
  _same_style(["prompt"] + ["responses"] * len(responses), [prompt] + responses)
  scores = row.get("scores")
  if scores is not None:
    if len(scores) != len(responses) or not all(isinstance(s, (int, float)) for s in scores):
      raise DataError("bad_scores", f"expected {len(responses)} numbers, found {scores!r}",
                      "scores")
    order = sorted(range(len(responses)), key=lambda i: -scores[i])
  else:
    order = list(range(len(responses)))
  pairs = []
  for i, j in itertools.combinations(order, 2):
    if (scores is not None and scores[i] == scores[j]) or responses[i] == responses[j]:
      continue
    margin = None if scores is None else float(scores[i] - scores[j])
    pairs.append({"prompt": prompt, "chosen": responses[i], "rejected": responses[j],
                  "margin": margin})
  return pairs


# ---------------------------------------------------------------- conversations


def _conversation(fmt, row, columns) -> list[dict]:
  col = "messages" if fmt == "messages" else "conversations"
  value = row[col]
  if not isinstance(value, (list, tuple)) or not value:
    raise DataError("bad_type", f"expected a non-empty list of messages, found {value!r:.60}", col)
  return _messages(value, col, columns)


def _alpaca(row) -> tuple[list[dict], Optional[list[dict]]]:
  for col in ("instruction", "input", "output"):
    if row.get(col) is not None and not isinstance(row[col], str):
      raise DataError("bad_type", f"found {type(row[col]).__name__}, expected str", col)
  text = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
  output = row.get("output")
  completion = None if output is None else [{"role": "assistant", "content": output}]
  return [{"role": "user", "content": text}], completion


LABEL_STRINGS = {"true": 1, "false": 0, "1": 1, "0": 0}  # CSV files hold strings


def _label(row) -> int:
  label = row["label"]
  if isinstance(label, bool) or (isinstance(label, (int, float)) and label in (0, 1)):
    return int(label)
  if isinstance(label, str) and label.strip().lower() in LABEL_STRINGS:
    return LABEL_STRINGS[label.strip().lower()]
  raise DataError("bad_label", f"found {label!r}, expected a bool, 0/1 or 'true'/'false'",
                  "label")


# ---------------------------------------------------------------- per kind


def _to_sft(fmt, row, raw, columns) -> list[dict]:
  if fmt in ("messages", "sharegpt"):
    msgs = _conversation(fmt, row, columns)
    assistants = [m for m in msgs if m["role"] == "assistant"]
    if not assistants:
      raise DataError("no_assistant", "conversation has no assistant message", fmt)
    _nonempty(assistants[-1]["content"], "messages" if fmt == "messages" else "conversations")
    return [{"messages": msgs}]
  if fmt == "text":
    if not isinstance(row["text"], str):
      raise DataError("bad_type", f"found {type(row['text']).__name__}, expected str", "text")
    return [{"text": _nonempty(row["text"], "text")}]
  if fmt == "alpaca":
    prompt, completion = _alpaca(row)
    if completion is None:
      raise DataError("missing_columns", f"found columns {sorted(raw)}; alpaca rows need "
                      "'output' for SFT", "output")
    return [{"prompt": prompt, "completion": _nonempty(completion, "output")}]
  if fmt == "prompt_completion":
    prompt, completion = _prompt_completion(row, columns, imitated=True)
    return [{"prompt": prompt, "completion": completion}]
  pair = _pair(fmt, row, columns)
  return [{"prompt": pair["prompt"], "completion": _nonempty(pair["chosen"], "chosen")}]


def _to_preference(fmt, row, raw, columns) -> list[dict]:
  if fmt == "ranked":
    return ranked_pairs(row, columns)
  return [_pair(fmt, row, columns)]


def _to_unpaired(fmt, row, raw, columns) -> list[dict]:
  if fmt == "unpaired":
    prompt, completion = _prompt_completion(row, columns, imitated=False)
    return [{"prompt": prompt, "completion": completion, "label": _label(row)}]
  pair = _pair(fmt, row, columns)
  return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": 1},
          {"prompt": pair["prompt"], "completion": pair["rejected"], "label": 0}]


def _to_prompt(fmt, row, raw, columns) -> list[dict]:
  if fmt in ("messages", "sharegpt"):
    msgs = _conversation(fmt, row, columns)
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    prompt = msgs[:last]
  elif fmt == "alpaca":
    prompt = _alpaca(row)[0]
  else:
    prompt = _value(row, "prompt", columns)
  if not prompt or (isinstance(prompt, str) and not prompt.strip()):
    raise DataError("empty_prompt", "prompt is empty", "prompt")
  return [{**raw, "prompt": prompt}]


_CONVERT = {"sft": _to_sft, "preference": _to_preference, "unpaired": _to_unpaired,
            "prompt": _to_prompt}
