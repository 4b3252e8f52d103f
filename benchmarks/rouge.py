"""ROUGE-L F of candidates against an instruction pool: jaxpost/data/rouge.py vs rouge-score.

    PYTHONPATH=.:/path/to/rouge_score_site python benchmarks/rouge.py [--candidates 1000]
        [--pool 10000] [--reference_candidates 20]

The Self-Instruct filter's workload: every new instruction is scored against the whole pool.
Texts are synthetic instructions (5-30 words drawn Zipf-like from a 2,000-word vocabulary, with
punctuation), the same for both. jaxpost scores all `--candidates` against the pool (one
RougePool); rouge-score (`RougeScorer(["rougeL"])`, pure Python) is timed on the first
`--reference_candidates` candidates only, in two ways: `score(target, prediction)` per pair, and
`_score_lcs` on pre-tokenised pools (what Self-Instruct's script calls); its full time is that
per-candidate time x candidates. The scores are checked equal on those candidates. Writes
benchmarks/results/rouge.md.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import versions, write_result  # noqa: E402

from jaxpost.data import rouge  # noqa: E402


def texts(n: int, rng: np.random.Generator) -> list[str]:
  vocab = [f"w{i}" if i % 7 else f"Word{i}" for i in range(2000)]
  p = 1.0 / np.arange(1, len(vocab) + 1)
  p /= p.sum()
  out = []
  for _ in range(n):
    words = rng.choice(vocab, size=rng.integers(5, 31), p=p)
    out.append(" ".join(w + (", " if rng.random() < 0.1 else "") for w in words) + "?")
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--candidates", type=int, default=1000)
  ap.add_argument("--pool", type=int, default=10000)
  ap.add_argument("--reference_candidates", type=int, default=20)
  ap.add_argument("--no_save", action="store_true")
  args = ap.parse_args()
  from rouge_score import rouge_scorer
  rng = np.random.default_rng(0)
  pool, cands = texts(args.pool, rng), texts(args.candidates, rng)

  start = time.perf_counter()
  scorer = rouge.RougePool(pool)
  build = time.perf_counter() - start
  start = time.perf_counter()
  ours = np.stack([scorer.scores(c) for c in cands])
  ours_s = time.perf_counter() - start

  ref = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
  k = args.reference_candidates
  start = time.perf_counter()
  ref_scores = [[ref.score(t, c)["rougeL"].fmeasure for t in pool] for c in cands[:k]]
  per_pair_s = (time.perf_counter() - start) / k
  tokenized = [ref._tokenizer.tokenize(t) for t in pool]  # pylint: disable=protected-access
  start = time.perf_counter()
  for c in cands[:k]:
    tokens = ref._tokenizer.tokenize(c)  # pylint: disable=protected-access
    [rouge_scorer._score_lcs(t, tokens).fmeasure for t in tokenized]  # pylint: disable=protected-access
  pretok_s = (time.perf_counter() - start) / k
  np.testing.assert_allclose(ours[:k], ref_scores, rtol=0, atol=1e-12)

  n = args.candidates
  table = [["method", "time for all candidates (s)", "per candidate (ms)", "jaxpost faster by"],
           [f"jaxpost RougePool (numpy, bit-parallel LCS; pool built in {build:.2f} s)",
            f"{ours_s:.2f}", f"{1e3 * ours_s / n:.2f}", "1x"],
           ["rouge-score `score(target, prediction)` per pair", f"{per_pair_s * n:.0f} (est.)",
            f"{1e3 * per_pair_s:.0f}", f"{per_pair_s * n / ours_s:.0f}x"],
           ["rouge-score `_score_lcs` on pre-tokenised pool (Self-Instruct's call)",
            f"{pretok_s * n:.0f} (est.)", f"{1e3 * pretok_s:.0f}", f"{pretok_s * n / ours_s:.0f}x"]]
  notes = (f"{n:,} candidates x a {args.pool:,}-text pool ({n * args.pool:,} pairs), one process. "
           f"rouge-score timed on {k} candidates and scaled to {n}; scores equal to 1e-12 on "
           f"those. {versions('rouge-score', 'numpy')}.")
  write_result("rouge", "ROUGE-L against an instruction pool (Self-Instruct filter)",
               "python benchmarks/rouge.py", table, notes, save=not args.no_save)


if __name__ == "__main__":
  main()
