"""Chat templates, tokenisation, loss masks and truncation for normalised examples.

Conversations render through the tokenizer's chat template (or `chat_template`: a Jinja string or
a file path), with `system_prompt` inserted when the conversation has none. Loss masks need no
`{% generation %}` markers: for a trained assistant turn i the template is rendered twice,

    pre_i  = render(messages[:i], add_generation_prompt=True)   # context, up to the content
    upto_i = render(messages[:i+1])                             # through the end of turn i

and the characters [len(pre_i), len(upto_i)) of render(messages) are that turn. This needs the
prefix property pre_i <= upto_i <= render(messages) (checked; a template that rewrites earlier
turns, e.g. one that strips past reasoning, is reported). The full render is tokenised once and a
token is trained when its character span overlaps a turn. Within a turn, trailing whitespace after
the last special token (the "\\n" after ChatML's <|im_end|>) is not trained; a turn with no special
token (the template does not end the turn) gets the EOS token appended and trained.

Preference and unpaired completions are tokenised exactly as TRL's DPOTrainer (v1.16):

    prompt_ids = tok(render(prompt, add_generation_prompt=True))
    full_c     = tok(render(prompt + completion_c))          (strings: tok(prompt + c + eos))
    n          = min_c common_prefix(prompt_ids, full_c)
    prompt_ids, completion_c = prompt_ids[:n], full_c[n:]

Truncation (`Limits`): the prompt is capped at max_prompt_length and completions at
max_completion_length (keeping their start); when prompt + longest completion still exceeds
max_length the prompt is cut first (down to max_prompt_length, or max_length // 2 when unset),
then the completions. `truncation_mode` says which end of a prompt (or of an unsplit sequence:
text, multi-turn) is kept. A prompt with no room left is a bad row ("prompt_too_long").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from jaxpost.data.formats import DataError

TRAIN_ON = ("last_assistant", "all_assistant", "all")
TRUNCATION_MODES = ("keep_start", "keep_end")


@dataclasses.dataclass(frozen=True)
class Limits:
  max_length: Optional[int] = None
  max_prompt_length: Optional[int] = None
  max_completion_length: Optional[int] = None
  truncation_mode: str = "keep_end"

  def __post_init__(self):
    if self.truncation_mode not in TRUNCATION_MODES:
      raise ValueError(f"data.truncation_mode={self.truncation_mode!r}; choose one of "
                       f"{TRUNCATION_MODES}")


def resolve_template(chat_template: Optional[str], tokenizer) -> Optional[str]:
  """A Jinja template string from a template, a file path or the tokenizer's own (None)."""
  if not chat_template:
    return getattr(tokenizer, "chat_template", None)
  if "{{" in chat_template or "{%" in chat_template:
    return chat_template
  path = Path(chat_template).expanduser()
  if path.is_file():
    return path.read_text()
  raise FileNotFoundError(f"data.chat_template={chat_template!r} is neither a Jinja template "
                          "nor an existing file")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = min(len(a), len(b))
  return next((i for i in range(n) if a[i] != b[i]), n)


class ChatTokenizer:
  """A HF tokenizer with a chat template, optional system prompt and mask-aware encoders."""

  def __init__(self, tokenizer, chat_template: Optional[str] = None,
               system_prompt: Optional[str] = None):
    self.tokenizer = tokenizer
    self.template = resolve_template(chat_template, tokenizer)
    self.system_prompt = system_prompt
    self.eos_id = tokenizer.eos_token_id
    if self.eos_id is None:
      raise ValueError("The tokenizer has no eos_token; set one before building data")
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
    added = getattr(tokenizer, "added_tokens_decoder", {})
    self.special_ids = frozenset(tokenizer.all_special_ids) | {
        i for i, t in added.items() if getattr(t, "special", False)}

  # ------------------------------------------------------------ primitives

  def with_system(self, messages: list[dict]) -> list[dict]:
    if self.system_prompt and (not messages or messages[0]["role"] != "system"):
      return [{"role": "system", "content": self.system_prompt}] + list(messages)
    return list(messages)

  def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template's text for `messages` (system prompt inserted when configured)."""
    if self.template is None:
      raise ValueError("The tokenizer has no chat template and data.chat_template is unset; "
                       "conversational rows need one")
    return self.tokenizer.apply_chat_template(
        self.with_system(messages), chat_template=self.template, tokenize=False,
        add_generation_prompt=add_generation_prompt)

  def encode(self, text: str, special: bool = False) -> list[int]:
    """Token ids; `special` adds the tokenizer's own BOS/EOS (plain text, as TRL does)."""
    return self.tokenizer(text, add_special_tokens=special)["input_ids"]

  # ------------------------------------------------------------ SFT

  def sft(self, example: dict, train_on: str = "all_assistant"):
    """(ids, mask, prompt_len) of one normalised SFT example (prompt_len None: no prompt).

    train_on: "all_assistant" trains every assistant turn (and a prompt/completion row's
    completion), "last_assistant" only the last turn, "all" every token of the same ids (TRL's
    assistant_only_loss=False / completion_only_loss=False); text rows train every token."""
    if train_on not in TRAIN_ON:
      raise ValueError(f"data.train_on={train_on!r}; choose one of {TRAIN_ON}")
    ids, mask, prompt_len = self._sft_masked(example, train_on)
    return ids, [1] * len(ids) if train_on == "all" else mask, prompt_len

  def _sft_masked(self, example: dict, train_on: str):
    if "text" in example:
      ids = self._with_eos(self.encode(example["text"], special=True))
      return ids, [0] + [1] * (len(ids) - 1), None
    if "messages" in example:
      msgs = self.with_system(example["messages"])
      turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
      ranges = [(i, i + 1) for i in (turns[-1:] if train_on == "last_assistant" else turns)]
      ids, mask = self.masked_render(msgs, ranges)
      return ids, mask, None
    prompt, completion = example["prompt"], example["completion"]
    if isinstance(prompt, str):
      p, (c,) = self.completions(prompt, [completion])
      return p + c, [0] * len(p) + [1] * len(c), len(p)
    msgs = self.with_system(prompt)
    ids, mask = self.masked_render(msgs + list(completion), [(len(msgs), len(msgs) +
                                                              len(completion))])
    return ids, mask, mask.index(1) if 1 in mask else len(ids)

  def masked_render(self, msgs: list[dict], ranges: list[tuple[int, int]]):
    """Tokens of render(msgs) and a mask of the turns msgs[a:b] for (a, b) in ranges."""
    renders = {}
    render = lambda n, gen=False: renders.get((n, gen)) or renders.setdefault(
        (n, gen), self.render(msgs[:n], add_generation_prompt=gen))
    full = render(len(msgs))
    spans = []
    for a, b in ranges:
      pre, upto = render(a, True), render(b)
      _check_prefix(pre, upto, a, "with the generation prompt")
      _check_prefix(upto, full, b, "")
      spans.append((len(pre), len(upto)))
    enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    out_ids, out_mask, t = [], [], 0
    for start, end in spans:
      before = t
      while t < len(ids) and offsets[t][1] <= start:
        t += 1
      out_ids += ids[before:t]
      out_mask += [0] * (t - before)
      turn = []
      while t < len(ids) and offsets[t][0] < end:
        turn.append(t)
        t += 1
      trained, tail = self._split_turn(turn, ids, offsets, full, end)
      trained_ids = [ids[i] for i in trained]
      if not any(i in self.special_ids for i in trained_ids):
        trained_ids.append(self.eos_id)
      out_ids += trained_ids + [ids[i] for i in tail]
      out_mask += [1] * len(trained_ids) + [0] * len(tail)
    out_ids += ids[t:]
    out_mask += [0] * (len(ids) - t)
    return out_ids, out_mask

  def _split_turn(self, turn, ids, offsets, text, end):
    """(trained, untrained tail): the tail is whitespace after the turn's last special token."""
    specials = [k for k, i in enumerate(turn) if ids[i] in self.special_ids]
    if specials and not text[offsets[turn[specials[-1]]][1]:end].strip():
      return turn[:specials[-1] + 1], turn[specials[-1] + 1:]
    return turn, []

  def _with_eos(self, ids: list[int]) -> list[int]:
    return ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id]

  # ------------------------------------------------------------ preference / unpaired / prompt

  def prompt(self, prompt) -> list[int]:
    """Prompt ids ready for generation (conversational: with the generation prompt)."""
    if isinstance(prompt, str):
      return self.encode(prompt, special=True)
    return self.encode(self.render(prompt, add_generation_prompt=True))

  def completions(self, prompt, completions: Sequence):
    """(prompt_ids, [completion_ids]) as TRL's DPO tokenisation (see module docstring)."""
    if isinstance(prompt, str):
      eos = self.tokenizer.eos_token
      texts = [c if c.endswith(eos) else c + eos for c in completions]
      full = [self.encode(prompt + c, special=True) for c in texts]
    else:
      full = [self.encode(self.render(list(prompt) + list(c))) for c in completions]
    p = self.prompt(prompt)
    n = min(common_prefix(p, f) for f in full)
    comps = [f[n:] for f in full]
    if not isinstance(prompt, str):
      comps = [c if any(i in self.special_ids for i in c) else c + [self.eos_id] for c in comps]
    return p[:n], comps


def _check_prefix(prefix: str, text: str, i: int, what: str):
  if not text.startswith(prefix):
    k = common_prefix(prefix, text)
    raise DataError(
        "template_not_incremental",
        f"the chat template renders messages[:{i}] {what} as text that is not a prefix of the "
        f"longer conversation (first difference at char {k}: {prefix[k:k + 40]!r} vs "
        f"{text[k:k + 40]!r}); loss masks need render(prefix) to be a prefix of render(all) - "
        "set data.chat_template to a template that does not rewrite earlier turns", "messages")


# ---------------------------------------------------------------- truncation + records


def _cut(ids: list, n: int, mode: str) -> list:
  n = min(n, len(ids))
  return ids[:n] if mode == "keep_start" else ids[len(ids) - n:]


def truncate_prompted(prompt: list, completions: list[list], lim: Limits):
  """(prompt, completions, truncated) within the limits; prompt cut first (module docstring)."""
  p, comps = prompt, [c[:lim.max_completion_length] if lim.max_completion_length else c
                      for c in completions]
  if lim.max_prompt_length and len(p) > lim.max_prompt_length:
    p = _cut(p, lim.max_prompt_length, lim.truncation_mode)
  longest = max(len(c) for c in comps)
  if lim.max_length and len(p) + longest > lim.max_length:
    budget = min(len(p), lim.max_prompt_length or lim.max_length // 2)
    p = _cut(p, max(lim.max_length - longest, budget), lim.truncation_mode)
    if len(p) >= lim.max_length:
      raise DataError("prompt_too_long", f"prompt has {len(p)} tokens, no room for a completion "
                      f"within max_length={lim.max_length}", "prompt")
    comps = [c[:lim.max_length - len(p)] for c in comps]
  truncated = len(p) < len(prompt) or any(len(a) < len(b) for a, b in zip(comps, completions))
  return p, comps, truncated


def _record(ids, mask) -> tuple[np.ndarray, np.ndarray]:
  mask = np.asarray(mask, np.int8)
  mask[:1] = 0  # token 0 has no prediction
  if not mask.any():
    raise DataError("no_trainable_tokens", "no trainable token left (after truncation)")
  return np.asarray(ids, np.int32), mask


def tokenize_example(ct: ChatTokenizer, example: dict, kind: str, lim: Limits,
                     train_on: str = "all_assistant") -> dict:
  """A tokenised record: sft {ids, mask}; preference {chosen_ids, chosen_mask, rejected_ids,
  rejected_mask, margin}; unpaired {ids, mask, label}; prompt {prompt_ids}; plus truncated."""
  if kind == "prompt":
    ids = ct.prompt(example["prompt"])
    limit = lim.max_prompt_length or lim.max_length
    if limit and len(ids) > limit:
      raise DataError("prompt_too_long", f"prompt has {len(ids)} tokens > {limit}", "prompt")
    return {"prompt_ids": np.asarray(ids, np.int32), "truncated": False}
  if kind == "sft":
    ids, mask, plen = ct.sft(example, train_on)
    if plen is not None:
      pairs = list(zip(ids, mask))
      p, (c,), truncated = truncate_prompted(pairs[:plen], [pairs[plen:]], lim)
      ids, mask = [i for i, _ in p + c], [m for _, m in p + c]
    else:
      truncated = bool(lim.max_length) and len(ids) > lim.max_length
      if truncated:
        ids, mask = (_cut(x, lim.max_length, lim.truncation_mode) for x in (ids, mask))
    ids, mask = _record(ids, mask)
    return {"ids": ids, "mask": mask, "truncated": truncated}
  names = ("chosen", "rejected") if kind == "preference" else ("completion",)
  prompt, comps = ct.completions(example["prompt"], [example[n] for n in names])
  if not all(comps):
    raise DataError("empty_completion", "completion has no tokens after the prompt", names[0])
  prompt, comps, truncated = truncate_prompted(prompt, comps, lim)
  out = {"truncated": truncated}
  for name, c in zip(names, comps):
    key = "" if kind == "unpaired" else name + "_"
    out[key + "ids"], out[key + "mask"] = _record(prompt + c, [0] * len(prompt) + [1] * len(c))
  if kind == "preference":
    out["margin"] = np.float32(np.nan if example.get("margin") is None else example["margin"])
  else:
    out["label"] = int(example["label"])
  return out
