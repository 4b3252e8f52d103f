"""ROUGE-L F (jaxpost/data/rouge.py): hand-computed cases, and equality with rouge-score (the
test-only reference; skipped where it is not installed) on random pairs."""

import random

import numpy as np
import pytest

from jaxpost.data import rouge

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "Mat", "red", "run", "42", "x1", "über",
         "don't", "e-mail", "ran", "big", "small", "is", "was"]
PUNCT = ["", " ", ", ", ". ", "! ", "? ", " - ", "...", "\n", "  ", "'", "(", ")"]


def test_hand_computed():
  # tokens: "the cat sat on the mat" vs "the cat on mat": LCS 4 -> P 4/4, R 4/6, F 0.8
  assert rouge.rouge_l("The cat, on mat!", "the cat sat on the mat") == pytest.approx(0.8)
  assert rouge.tokenize("Don't e-mail ÜBER 42x") == ["don", "t", "e", "mail", "ber", "42x"]
  assert rouge.rouge_l("", "a b") == 0.0 and rouge.rouge_l("a b", "") == 0.0
  assert rouge.rouge_l("!!!", "???") == 0.0 and rouge.rouge_l("a b c", "d e") == 0.0
  assert rouge.rouge_l("b a", "a b") == pytest.approx(0.5)  # LCS 1 of 2 and 2


def test_long_texts_cross_word_boundaries():
  rng = random.Random(0)
  a = [rng.choice("abcdef") for _ in range(150)]  # 3 words of 64 bits
  b = [rng.choice("abcdef") for _ in range(97)]
  table = np.zeros((len(a) + 1, len(b) + 1), int)  # the textbook DP, for the LCS length
  for i in range(len(a)):
    for j in range(len(b)):
      table[i + 1, j + 1] = table[i, j] + 1 if a[i] == b[j] else max(table[i, j + 1],
                                                                       table[i + 1, j])
  pool = rouge.RougePool([" ".join(b), " ".join(a[:40])])
  lcs, m = pool.lcs(" ".join(a))
  assert m == 150 and lcs[0] == table[-1, -1] and lcs[1] == 40


def _sentence(rng):
  n = rng.choice([0, 0, 1, 3, 8, 20, 70])
  return "".join(rng.choice(WORDS) + rng.choice(PUNCT) for _ in range(n)) + rng.choice(PUNCT)


def test_equals_rouge_score_on_random_pairs():
  rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
  rng = random.Random(1)
  preds = [_sentence(rng) for _ in range(500)]
  targets = [_sentence(rng) for _ in range(500)]
  ours = [rouge.rouge_l(p, t) for p, t in zip(preds, targets)]
  ref = [scorer.score(t, p)["rougeL"].fmeasure for p, t in zip(preds, targets)]
  assert sum(p.strip(" .,!?-'()\n") == "" for p in preds) > 20  # empty / punctuation-only
  assert sum(0 < r < 1 for r in ref) > 150
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
  matrix = rouge.rouge_l_matrix(preds[:20], targets[:30])  # one pool, many candidates
  ref_matrix = [[scorer.score(t, p)["rougeL"].fmeasure for t in targets[:30]] for p in preds[:20]]
  np.testing.assert_allclose(matrix, ref_matrix, rtol=0, atol=1e-12)
