"""Inputs and outputs of generation: prompt encoding (chat template or raw), validation of the
sampling arguments before anything compiles, stop strings, and the `GenerateResult` record."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np

@dataclasses.dataclass
class GenerateResult:
  """One entry per (prompt, sample) row, prompt-major: row i*n + j is sample j of prompt i.

  tokens: new token ids (ending with the EOS/stop token, or the token completing a stop string);
  texts: decoded completions without the stop token / stop string (None without a tokenizer);
  logprobs: log p_model(token) per token; sampling_logprobs: log q(token) under the processed
  sampling distribution (0 for greedy); finish_reasons: "stop" or "length".
  """
  tokens: List[List[int]]
  texts: List[Optional[str]]
  lengths: List[int]
  finish_reasons: List[str]
  logprobs: List[np.ndarray]
  sampling_logprobs: List[np.ndarray]
  prompt_tokens: List[List[int]]
  prompt_index: List[int]

  def __len__(self):
    return len(self.tokens)

  @classmethod
  def from_rows(cls, rows, prompts, n, tokenizer):
    def text(r):
      if r["by_string"] or tokenizer is None:
        return r["text"]
      ids = r["tokens"][:-1] if r["stopped"] else r["tokens"]
      return tokenizer.decode(ids, skip_special_tokens=True)
    return cls(tokens=[r["tokens"] for r in rows], texts=[text(r) for r in rows],
               lengths=[len(r["tokens"]) for r in rows],
               finish_reasons=["stop" if r["stopped"] else "length" for r in rows],
               logprobs=[r["logprobs"] for r in rows],
               sampling_logprobs=[r["sampling_logprobs"] for r in rows],
               prompt_tokens=[prompts[i // n] for i in range(len(rows))],
               prompt_index=[i // n for i in range(len(rows))])


def eos_ids(cfg) -> tuple:
  """The config's EOS id(s) as a tuple (HF allows an int or a list)."""
  eos = cfg.eos_token_id
  if eos is None:
    return ()
  return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def validate_sampling(cfg, max_new_tokens, temperature, top_k, top_p, min_p, stop_ids, n=1,
                      stop_strings=()):
  """Raises ValueError on bad sampling arguments, before anything is compiled."""
  checks = [
      (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1,
       f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}"),
      (np.isfinite(temperature) and temperature >= 0,
       f"temperature must be >= 0 (0 = greedy), got {temperature!r}"),
      (isinstance(top_k, (int, np.integer)) and 0 <= top_k <= cfg.vocab_size,
       f"top_k must be an int in [0, vocab_size={cfg.vocab_size}] (0 = off), got {top_k!r}"),
      (0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p!r}"),
      (0 <= min_p <= 1, f"min_p must be in [0, 1], got {min_p!r}"),
      (isinstance(n, (int, np.integer)) and n >= 1, f"n must be an int >= 1, got {n!r}"),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)
  for i in stop_ids:
    if not 0 <= i < cfg.vocab_size:
      raise ValueError(f"stop token id {i} is not in the vocabulary [0, {cfg.vocab_size})")
  if isinstance(stop_strings, str) or not all(isinstance(s, str) and s for s in stop_strings):
    raise ValueError(f"stop_strings must be a list of non-empty strings, got {stop_strings!r}")


def _is_messages(prompt) -> bool:
  return isinstance(prompt, (list, tuple)) and bool(prompt) and all(
      isinstance(m, dict) and "role" in m and "content" in m for m in prompt)


def _render(tokenizer, messages, chat_template, where):
  if tokenizer is None:
    raise ValueError(f"{where}: text prompts need a tokenizer (lm.tokenizer is None)")
  template = chat_template if isinstance(chat_template, str) else None
  if template is None and not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"{where}: the tokenizer has no chat template; pass chat_template=<jinja "
                     "string>, or plain strings with chat_template=False")
  text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=True)
  return tokenizer.encode(text, add_special_tokens=False)


def encode_prompt(tokenizer, prompt, chat_template=None, where="prompt") -> List[int]:
  """Token ids of one prompt: a message list, a string or a list of ids (see `generate`)."""
  if isinstance(prompt, str):
    if not prompt:
      raise ValueError(f"{where} is an empty string")
    use_template = chat_template is not False and (
        chat_template is not None or getattr(tokenizer, "chat_template", None))
    if use_template:
      return _render(tokenizer, [{"role": "user", "content": prompt}], chat_template, where)
    if tokenizer is None:
      raise ValueError(f"{where}: text prompts need a tokenizer (lm.tokenizer is None)")
    return tokenizer.encode(prompt)
  if _is_messages(prompt):
    return _render(tokenizer, list(prompt), chat_template, where)
  if isinstance(prompt, (list, tuple, np.ndarray)) and all(
      isinstance(t, (int, np.integer)) for t in prompt):
    if len(prompt) == 0:
      raise ValueError(f"{where} is empty")
    return [int(t) for t in prompt]
  raise ValueError(f"{where} must be a string, a list of {{'role', 'content'}} messages or a "
                   f"list of token ids, got {type(prompt).__name__}: {str(prompt)[:80]!r}")


def encode_prompts(tokenizer, prompts, chat_template, cfg, max_new_tokens) -> List[List[int]]:
  """Encodes and validates every prompt (non-empty, ids in the vocabulary, fits the context)."""
  if isinstance(prompts, str):
    prompts = [prompts]
  if not len(prompts):
    raise ValueError("prompts is empty")
  out = []
  for i, prompt in enumerate(prompts):
    ids = encode_prompt(tokenizer, prompt, chat_template, f"prompt {i}")
    if not ids:
      raise ValueError(f"prompt {i} encodes to no tokens")
    if min(ids) < 0 or max(ids) >= cfg.vocab_size:
      raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
    if len(ids) + max_new_tokens > cfg.max_position_embeddings:
      raise ValueError(
          f"prompt {i}: {len(ids)} prompt tokens + max_new_tokens={max_new_tokens} exceed the "
          f"model's context (max_position_embeddings={cfg.max_position_embeddings})")
    out.append(ids)
  return out


def find_stop_string(tokenizer, ids, stop_strings):
  """(k, text) for the earliest stop string in decode(ids): k = the fewest tokens whose text
  contains it, text = the decoded text cut just before it. None when no stop string occurs."""
  text = tokenizer.decode(ids, skip_special_tokens=True)
  hits = [(text.find(s), s) for s in stop_strings if s in text]
  if not hits:
    return None
  start_char, s = min(hits)
  lo, hi = 1, len(ids)
  while lo < hi:  # smallest k with len(decode(ids[:k])) >= end of the stop string
    mid = (lo + hi) // 2
    if len(tokenizer.decode(ids[:mid], skip_special_tokens=True)) >= start_char + len(s):
      hi = mid
    else:
      lo = mid + 1
  return lo, text[:start_char]
