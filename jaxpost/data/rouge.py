"""ROUGE-L F-measure (Lin 2004), vectorised over a pool of texts with bit-parallel LCS.

Equal to `rouge-score`'s `RougeScorer(["rougeL"]).score(target, prediction).fmeasure` (the
scorer Self-Instruct filters with), including its tokenisation: lower-case, every run of
characters outside [a-z0-9] is a separator, no stemming. For token lists a (prediction) and
b (target) with LCS length l:

    P = l / |a|     R = l / |b|     F = 2 P R / (P + R)     (0 when either list is empty or l = 0)

LCS lengths come from the bit-vector recurrence of Allison & Dix (1986) / Hyyrö (2004): with
M[t] the bit mask of the positions of token t in the candidate (m bits, 64 per word) and
V = all ones, each token t of the other text does

    U = V & M[t];   V = (V + U) | (V - U)        (V - U = V & ~U, since U ⊆ V)

and l = the number of zero bits among the low m bits of V. One candidate is scored against every
text of the pool at once: the recurrence runs over the pool's token positions with numpy arrays
of P words (carries propagate between the words of a candidate longer than 64 tokens), i.e.
O(m/64 · n) vector operations instead of the O(m · n) Python steps of a DP table per pair.

    pool = RougePool(["Give three tips for staying healthy.", ...])
    pool.scores("Give 3 tips to stay healthy.")   # float64 [len(pool)]
    pool.add("What is the capital of France?")
    rouge_l("a b c", "a c")                        # one pair (prediction, target)
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

_SEPARATORS = re.compile(r"[^a-z0-9]+")
_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


def tokenize(text: str) -> list[str]:
  """rouge-score's tokens: lower-case alphanumeric runs."""
  return [t for t in _SEPARATORS.split(text.lower()) if t]


def _fmeasure(lcs: np.ndarray, n_pred: int, n_target: np.ndarray) -> np.ndarray:
  """F from LCS lengths, computed as rouge-score does (P, R, then 2PR / (P + R))."""
  with np.errstate(divide="ignore", invalid="ignore"):
    p = lcs / float(max(n_pred, 1))
    r = lcs / np.maximum(n_target, 1).astype(np.float64)
    f = 2 * p * r / (p + r)
  return np.where((lcs > 0) & (n_target > 0) & (n_pred > 0), f, 0.0)


class RougePool:
  """A growing pool of tokenised texts scored against one candidate at a time (module doc)."""

  def __init__(self, texts: Iterable[str] = ()):
    self._vocab: dict[str, int] = {}
    self._ids = np.zeros((0, 0), np.int32)  # [capacity, width], -1 = padding
    self._lengths = np.zeros(0, np.int64)
    self._size = 0
    self.texts: list[str] = []
    for text in texts:
      self.add(text)

  def __len__(self) -> int:
    return self._size

  def _encode(self, tokens: Sequence[str], grow: bool) -> list[int]:
    if grow:
      return [self._vocab.setdefault(t, len(self._vocab)) for t in tokens]
    return [self._vocab.get(t, -1) for t in tokens]

  def add(self, text: str):
    ids = self._encode(tokenize(text), grow=True)
    rows, width = self._ids.shape
    if self._size == rows or len(ids) > width:  # grow by doubling: amortised O(1) per text
      grown = np.full((max(2 * rows, 16) if self._size == rows else rows, max(width, len(ids))),
                      -1, np.int32)
      grown[:rows, :width] = self._ids
      self._ids = grown
      self._lengths = np.concatenate([self._lengths,
                                      np.zeros(len(grown) - rows, np.int64)])
    self._ids[self._size, :len(ids)] = ids
    self._ids[self._size, len(ids):] = -1
    self._lengths[self._size] = len(ids)
    self._size += 1
    self.texts.append(text)

  def lcs(self, candidate: str) -> tuple[np.ndarray, int]:
    """(LCS length with every pool text [P], the candidate's token count)."""
    ids = self._encode(tokenize(candidate), grow=False)
    m, n = len(ids), self._size
    if m == 0 or n == 0:
      return np.zeros(n, np.int64), m
    words = -(-m // 64)
    # masks[t + 1, w]: bits of candidate positions holding pool token t (row 0: padding / absent)
    known = sorted({i for i in ids if i >= 0})
    slot = np.zeros(len(self._vocab) + 1, np.int64)
    slot[np.asarray(known, np.int64) + 1] = np.arange(1, len(known) + 1)
    masks = np.zeros((len(known) + 1, words), np.uint64)
    for pos, i in enumerate(ids):
      if i >= 0:
        masks[slot[i + 1], pos // 64] |= np.uint64(1) << np.uint64(pos % 64)
    pool = slot[self._ids[:n] + 1]  # [P, width] -> mask rows
    v = np.full((n, words), _ONES, np.uint64)
    for j in range(int(self._lengths[:n].max())):
      u = v & masks[pool[:, j]]
      carry = np.zeros(n, np.uint64)
      for w in range(words):
        t = v[:, w] + u[:, w]
        s = t + carry
        carry = ((t < v[:, w]) | ((carry == 1) & (s == 0))).astype(np.uint64)
        v[:, w] = s | (v[:, w] & ~u[:, w])
    low = np.full(words, _ONES, np.uint64)
    if m % 64:
      low[-1] = (np.uint64(1) << np.uint64(m % 64)) - np.uint64(1)
    zeros = np.bitwise_count(~v & low).sum(axis=1)
    return zeros.astype(np.int64), m

  def scores(self, candidate: str) -> np.ndarray:
    """ROUGE-L F of `candidate` (the prediction) against every pool text (the targets)."""
    lcs, m = self.lcs(candidate)
    return _fmeasure(lcs, m, self._lengths[:self._size])

  def max_score(self, candidate: str) -> float:
    """The highest ROUGE-L F against the pool (0 for an empty pool)."""
    return float(self.scores(candidate).max()) if self._size else 0.0


def rouge_l(prediction: str, target: str) -> float:
  """ROUGE-L F of one pair (rouge-score's `score(target, prediction)`)."""
  return float(RougePool([target]).scores(prediction)[0])


def rouge_l_matrix(candidates: Sequence[str], pool: Sequence[str]) -> np.ndarray:
  """float64 [len(candidates), len(pool)]: ROUGE-L F of each candidate against each pool text."""
  scorer = RougePool(pool)
  return np.stack([scorer.scores(c) for c in candidates]) if candidates else np.zeros(
      (0, len(pool)))
