"""Python reward functions (jaxpost/rewards.py): specs, TRL's signature, the None rule, metrics,
weights and the errors (function spec + row, or the config key)."""

import math
import re
import textwrap

import numpy as np
import pytest

from jaxpost import rewards
from jaxpost.data.tasks import task_rows

Q = "What is 2 + 3? Answer with just the number."


def write(path, source):
  path.write_text(textwrap.dedent(source))
  return path


@pytest.fixture
def file_funcs(tmp_path):
  """A reward file with several functions (and a non-callable) in tmp_path."""
  return write(tmp_path / "my_rewards.py", """
      LIMIT = 3

      def short(completions, **kwargs):
        return [1.0 if len(c) <= LIMIT else 0.0 for c in completions]

      def echo(prompts, completions, value, **kwargs):
        return value

      def maybe(prompts, completions, **kwargs):
        return [None if c.startswith("?") else 0.5 for c in completions]

      def never(prompts, completions, **kwargs):
        return [None] * len(completions)

      def boom_on_x(prompts, completions, **kwargs):
        return [1 / 0 if c == "x" else 1.0 for c in completions]

      def arrays(completions, **kwargs):
        import numpy
        return [numpy.float32(0.5), numpy.asarray(2), numpy.asarray(-1.5), True][:len(completions)]

      def boom_batch(prompts, completions, **kwargs):
        if len(completions) > 1:
          raise RuntimeError("batched scorer is down")
        return [1.0]
  """)


def test_builtin_arithmetic_uses_answer_column_and_reads_conversations():
  fns = rewards.load("builtin:arithmetic")
  assert fns.names == ["arithmetic"]
  prompts = [Q, Q, Q, Q]
  completions = ["5", "6", "It is 5.", "nothing"]
  assert fns(prompts, completions, {"answer": [5] * 4}).total.tolist() == [1, 0, 1, 0]
  # The column wins over recomputing the prompt: answer 6 makes "6" the right one.
  assert fns(prompts, completions, {"answer": [6] * 4}).total.tolist() == [0, 1, 0, 0]
  assert fns(prompts, completions).total.tolist() == [1, 0, 1, 0]  # no column: from the prompt
  rows = task_rows("arithmetic", "eval", "prompt")[:3]  # conversational rows
  chats = [[{"role": "assistant", "content": str(r["answer"] + k)}] for k, r in enumerate(rows)]
  scores = fns([r["prompt"] for r in rows], chats, {"answer": [r["answer"] for r in rows]})
  assert scores.total.tolist() == [1, 0, 0]
  assert scores.total.dtype == np.float32 and scores.per_function.shape == (1, 3)


def test_file_and_module_functions(file_funcs, tmp_path, monkeypatch):
  fns = rewards.load([f"{file_funcs}:short", f"{file_funcs}:echo"])
  assert fns.names == ["short", "echo"]
  scores = fns(["p", "p"], ["ab", "abcd"], {"value": [0.25, -2]})
  np.testing.assert_array_equal(scores.per_function, [[1, 0], [0.25, -2]])
  np.testing.assert_allclose(scores.total, [1.25, -2])
  assert fns.functions[0].fn.__globals__ is fns.functions[1].fn.__globals__  # executed once
  assert rewards.load(f"{file_funcs}:arrays")(["p"] * 4, list("abcd")).total.tolist() == [
      0.5, 2, -1.5, 1]  # numpy scalars, 0-d arrays and bools are numbers

  package = tmp_path / "jp_reward_pkg"
  package.mkdir()
  (package / "__init__.py").write_text("")
  write(package / "sub.py", """
      class Scorer:
        @staticmethod
        def length(completions, **kwargs):
          return [float(len(c)) for c in completions]
  """)
  monkeypatch.syspath_prepend(str(tmp_path))
  fns = rewards.load("jp_reward_pkg.sub:Scorer.length")
  assert fns.names == ["length"] and fns.functions[0].spec == "jp_reward_pkg.sub:Scorer.length"
  assert fns(["p"], ["abc"]).total.tolist() == [3.0]


def test_callables_weights_and_comma_separated_specs(file_funcs):
  def bonus(prompts, completions, **kwargs):
    return [2.0 for _ in completions]

  fns = rewards.load(f"builtin:arithmetic, {file_funcs}:short ,", weights="2, 0.5")
  assert fns.names == ["arithmetic", "short"]
  np.testing.assert_allclose(fns([Q] * 3, ["5", "6", "It is 5."]).total,
                             [2 * 1 + 0.5 * 1, 2 * 0 + 0.5 * 1, 2 * 1 + 0.5 * 0])
  fns = rewards.load([bonus, "builtin:arithmetic", bonus], weights=[1, -1, 0.5])
  assert fns.names == ["bonus", "arithmetic", "bonus_2"]
  np.testing.assert_allclose(fns([Q, Q], ["5", "0"]).total, [2 - 1 + 1, 2 - 0 + 1])
  assert rewards.load(bonus).names == ["bonus"]


def test_none_counts_zero_unless_every_function_is_none(file_funcs):
  fns = rewards.load([f"{file_funcs}:maybe", f"{file_funcs}:short"], weights=[2.0, 1.0])
  completions = ["ok", "?ok", "?long", "long"]
  scores = fns(["p"] * 4, completions)
  nan = math.nan
  np.testing.assert_array_equal(scores.per_function, [[0.5, nan, nan, 0.5], [1, 1, 0, 0]])
  np.testing.assert_array_equal(scores.total, [2 * 0.5 + 1, 1, 0, 2 * 0.5])  # None -> 0

  fns = rewards.load([f"{file_funcs}:maybe", f"{file_funcs}:never"])
  scores = fns(["p"] * 3, ["a", "?b", "c"])
  np.testing.assert_array_equal(scores.total, [0.5, nan, 0.5])  # all None -> unscorable
  m = scores.metrics
  assert m["rewards/maybe/mean"] == 0.5 and m["rewards/maybe/std"] == 0.0
  assert math.isnan(m["rewards/never/mean"]) and math.isnan(m["rewards/never/std"])
  assert m["reward"] == 0.5 and m["reward_std"] == 0.0


def test_metrics_by_hand(file_funcs):
  fns = rewards.load([f"{file_funcs}:echo", f"{file_funcs}:maybe"], weights=[1.0, 2.0])
  value = [1.0, 2.0, 4.0, None]
  scores = fns(["p"] * 4, ["a", "?", "c", "?"], {"value": value})
  # echo: 1, 2, 4 scorable -> mean 7/3, unbiased var ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3.
  m = scores.metrics
  assert m["rewards/echo/mean"] == pytest.approx(7 / 3)
  assert m["rewards/echo/std"] == pytest.approx(math.sqrt(7 / 3))
  assert m["rewards/maybe/mean"] == 0.5 and m["rewards/maybe/std"] == 0.0
  # totals: 1 + 2*0.5, 2 + 0, 4 + 2*0.5, NaN -> over 2, 2, 5: mean 3, var (1 + 1 + 4) / 2 = 3.
  np.testing.assert_array_equal(scores.total, [2, 2, 5, np.nan])
  assert m["reward"] == pytest.approx(3.0) and m["reward_std"] == pytest.approx(math.sqrt(3))
  assert set(m) == {"rewards/echo/mean", "rewards/echo/std", "rewards/maybe/mean",
                    "rewards/maybe/std", "reward", "reward_std"}


@pytest.mark.parametrize("source, pattern", [
    ("return [1.0]", r"returned 1 rewards for 3 completions"),
    ("return 1.0", r"must return a list of float \| None, got float"),
    ("return (r for r in [1.0] * 3)", r"must return a list of float \| None, got generator"),
    ("return [1.0, 2j, 0.0]", r"at row 1 \(prompt 'prompt 1'\): returned complex 2j"),
    ("return [1.0, 'high', 0.0]", r"at row 1 \(prompt 'prompt 1'\): returned str 'high', not a number"),
    ("return [1.0, 0.0, float('nan')]", r"at row 2 \(prompt 'prompt 2'\): returned nan"),
    ("return [float('-inf'), 0.0, 0.0]", r"at row 0 \(prompt 'prompt 0'\): returned -inf"),
])
def test_bad_return_values_name_function_and_row(tmp_path, source, pattern):
  path = write(tmp_path / "bad.py", f"def bad(prompts, completions, **kw):\n  {source}\n")
  fns = rewards.load(f"{path}:bad")
  with pytest.raises(rewards.RewardError, match=rf"reward function '{re.escape(str(path))}:bad' \(bad\).*{pattern}"):
    fns([f"prompt {i}" for i in range(3)], ["a", "b", "c"])


def test_raising_function_names_the_row(file_funcs):
  fns = rewards.load(f"{file_funcs}:boom_on_x")
  long_prompt = [{"role": "user", "content": "What is 7 * 8? " + "please " * 20}]
  with pytest.raises(rewards.RewardError,
                     match=r"boom_on_x' \(boom_on_x\) at row 1 \(prompt 'What is 7 \* 8\? "
                           r"please.*\.\.\.'\): raised ZeroDivisionError") as info:
    fns(["p", long_prompt, "p"], ["a", "x", "x"])
  assert isinstance(info.value.__cause__, ZeroDivisionError)
  fns = rewards.load(f"{file_funcs}:boom_batch")
  assert fns(["p"], ["a"]).total.tolist() == [1.0]
  with pytest.raises(rewards.RewardError, match=r"boom_batch.*raised RuntimeError: batched "
                                                r"scorer is down \(on the whole batch"):
    fns(["p", "q"], ["a", "b"])


def test_bad_columns_and_lengths():
  fns = rewards.load("builtin:arithmetic")
  with pytest.raises(rewards.RewardError, match="2 prompts but 1 completions"):
    fns([Q, Q], ["5"])
  with pytest.raises(rewards.RewardError, match="column 'answer' has 1 values for 2"):
    fns([Q, Q], ["5", "5"], {"answer": [5]})


@pytest.mark.parametrize("spec, pattern", [
    ("{dir}/missing.py:fn", r"'{dir}/missing.py:fn': no file {dir}/missing.py"),
    ("{dir}/my_rewards.py:nope", r"'{dir}/my_rewards.py:nope': .*has no attribute 'nope'"),
    ("{dir}/my_rewards.py:LIMIT", r"'{dir}/my_rewards.py:LIMIT': LIMIT is a int, not a function"),
    ("{dir}/syntax.py:fn", r"'{dir}/syntax.py:fn': .*failed to import: SyntaxError"),
    ("{dir}/sig.py:fn", r"'{dir}/sig.py:fn': it must accept the keywords prompts= and completions="),
    ("no_such_module_xyz:fn", r"'no_such_module_xyz:fn': module 'no_such_module_xyz' failed"),
    ("builtin:chess", r"'builtin:chess': unknown built-in task 'chess' \(known: arithmetic\)"),
    ("arithmetic", r"'arithmetic': expected builtin:<task>, path/to/file.py:fn or module:fn"),
])
def test_unloadable_specs_name_spec_and_key(file_funcs, tmp_path, spec, pattern):
  write(tmp_path / "syntax.py", "def fn(prompts, completions:\n  return []\n")
  write(tmp_path / "sig.py", "def fn(x):\n  return [x]\n")
  spec, pattern = spec.format(dir=tmp_path), pattern.format(dir=re.escape(str(tmp_path)))
  with pytest.raises(rewards.RewardError, match=rf"^reward\.funcs: cannot load reward function "
                                                rf".*{pattern}"):
    rewards.load(["builtin:arithmetic", spec])


def test_bad_funcs_and_weights_name_the_key(file_funcs):
  with pytest.raises(rewards.RewardError, match=r"reward\.funcs is empty"):
    rewards.load(" , ")
  with pytest.raises(rewards.RewardError, match=r"reward\.funcs must be .* got int"):
    rewards.load(3)
  two = f"builtin:arithmetic,{file_funcs}:short"
  with pytest.raises(rewards.RewardError, match=r"reward\.weights has 1 weight\(s\) but "
                                                r"reward\.funcs names 2 function\(s\)"):
    rewards.load(two, weights=[1.0])
  with pytest.raises(rewards.RewardError, match=r"reward\.weights must be numbers"):
    rewards.load(two, weights="1,heavy")
  with pytest.raises(rewards.RewardError, match=r"reward\.weights must be finite"):
    rewards.load(two, weights=[1.0, math.inf])
