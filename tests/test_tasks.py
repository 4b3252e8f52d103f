"""Built-in arithmetic task: determinism, disjoint splits, row formats and the checker."""

import numpy as np
import pytest

from jaxpost.data import tasks
from jaxpost.data.tasks import arithmetic, reward_fn, task_rows


def plain(split, kind, **kw):
  return task_rows("arithmetic", split, kind, conversational=False, **kw)


def prompts(split, kind="prompt"):
  return {r["prompt"] for r in plain(split, kind)}


def test_deterministic_across_regeneration():
  first = plain("train", "preference")
  arithmetic.questions.cache_clear()
  again = plain("train", "preference")
  assert first == again
  assert first[0] == {"prompt": "What is 29 + 29 - 12? Answer with just the number.",
                      "chosen": "46", "rejected": again[0]["rejected"]}


def test_sizes_and_disjoint_splits():
  train, held = prompts("train"), prompts("eval")
  assert len(train) == arithmetic.TRAIN_SIZE and len(held) == arithmetic.EVAL_SIZE  # unique
  assert not train & held
  for kind in set(tasks.KINDS) - set(tasks.SAMPLED_KINDS):
    assert prompts("eval", kind) == held
  for kind in tasks.SAMPLED_KINDS:  # only the prompts with a pair, each on its split's side
    assert prompts("eval", kind) <= held and prompts("train", kind) <= train


def test_rows_are_correct_and_consistent():
  check = reward_fn("arithmetic")
  for r in plain("eval", "prompt"):
    assert r["answer"] == arithmetic.evaluate(r["prompt"])
  sft = plain("eval", "sft")
  pref = plain("eval", "preference")
  assert [r["completion"] for r in sft] == [r["chosen"] for r in pref]
  ps = [r["prompt"] for r in pref]
  assert np.all(check(ps, [r["chosen"] for r in pref]) == 1.0)
  rejected = [r["rejected"] for r in pref]
  wrong = check(ps, rejected) == 0.0
  rambling = np.array([not arithmetic.is_concise(t) for t in rejected])
  assert np.all(wrong | rambling) and 0.3 < wrong.mean() < 0.9 and 0.3 < rambling.mean() < 0.9


def test_ranked_rows_are_strictly_ordered():
  scorer = reward_fn("arithmetic", format_weight=arithmetic.FORMAT_WEIGHT)
  for k in (3, 4):
    rows = plain("eval", "ranked", k=k)
    for r in rows:
      assert len(r["responses"]) == k == len(set(r["responses"]))
      assert list(scorer([r["prompt"]] * k, r["responses"])) == r["scores"]
      assert all(a > b for a, b in zip(r["scores"], r["scores"][1:]))  # C(k,2) strict pairs


def test_unpaired_rows():
  rows = plain("eval", "unpaired")
  labels = np.array([r["label"] for r in rows])
  assert len(rows) == 2 * arithmetic.EVAL_SIZE and labels.mean() == 0.5
  assert labels[:20].tolist() != [True, False] * 10  # shuffled, not chosen/rejected alternation
  scores = reward_fn("arithmetic")([r["prompt"] for r in rows], [r["completion"] for r in rows])
  assert np.all(scores[labels] == 1.0)


def test_onpolicy_rows_are_verified_pairs_of_the_bundled_model():
  check = reward_fn("arithmetic")
  for split, sampled in (("train", 512), ("eval", 96)):  # the prompts sampled (tasks docstring)
    rows = plain(split, "onpolicy")
    first = set(arithmetic.prompt_of(q) for q in arithmetic.questions(split)[:sampled])
    ps = [r["prompt"] for r in rows]
    assert len(set(ps)) == len(ps) and set(ps) <= first and len(rows) >= sampled // 8
    assert np.all(check(ps, [r["chosen"] for r in rows]) == 1.0)
    assert np.all(check(ps, [r["rejected"] for r in rows]) == 0.0)
    assert all(r["chosen_reward"] == 1.0 and r["rejected_reward"] == 0.0 for r in rows)
    assert [r["answer"] for r in rows] == [arithmetic.evaluate(p) for p in ps]
  conv = task_rows("arithmetic", "eval", "onpolicy")
  assert conv[0]["chosen"] == [{"role": "assistant", "content": plain("eval", "onpolicy")[0][
      "chosen"]}]


def test_conversational_rows_by_default():
  conv, flat = task_rows("arithmetic", "eval", "ranked"), plain("eval", "ranked")
  assert conv[0]["prompt"] == [{"role": "user", "content": flat[0]["prompt"]}]
  assert conv[0]["responses"][1] == [{"role": "assistant", "content": flat[0]["responses"][1]}]
  pref = task_rows("arithmetic", "eval", "preference")
  scores = reward_fn("arithmetic")([r["prompt"] for r in pref], [r["chosen"] for r in pref])
  assert np.all(scores == 1.0)  # message lists are scored by their last user/assistant content


@pytest.mark.parametrize("text,want", [
    ("85", 85), (" 85.\n", 85), ("The answer is 1,234.", 1234), ("37 + 48 = 85", 85),
    ("-7", -7), ("no idea", None), ("It is 12, not 13", 13)])
def test_extract_answer(text, want):
  assert arithmetic.extract_answer(text) == want


def test_reward_fn_scores():
  f = reward_fn("arithmetic", format_weight=0.5)
  p = "What is 12 * 11? Answer with just the number."
  conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}]
  got = f([p, p, p, conv, p], ["132", "It is 132.", "131", "132", "no"])
  np.testing.assert_array_equal(got, [1.5, 1.0, 0.5, 1.5, 0.0])
  assert f([p], ["7"], [{"answer": 7}])[0] == 1.5  # a row's answer takes precedence
  assert arithmetic.evaluate("What is 20 + 5 - 30?") == -5


@pytest.mark.parametrize("call,match", [
    (lambda: task_rows("poetry", "train", "sft"), "unknown built-in task"),
    (lambda: task_rows("arithmetic", "test", "sft"), "split"),
    (lambda: task_rows("arithmetic", "train", "pairs"), "kind"),
    (lambda: task_rows("arithmetic", "train", "ranked", k=5), "k must be"),
    (lambda: reward_fn("arithmetic")(["x"], ["1", "2"]), "1 prompts vs 2"),
    (lambda: arithmetic.evaluate("Tell me a joke"), "cannot parse")])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()
