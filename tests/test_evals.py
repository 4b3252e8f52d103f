"""The evaluators of jaxpost/train/evals.py: rollout metrics of held-out prompts (reward, KL to
the reference, lengths, EOS rate), named evaluators at their own intervals, and config errors
that name the key before any model loads."""

import json
import math

import numpy as np
import pytest

import jaxpost
from jaxpost import configs
from jaxpost.train.validate import ConfigError

ROLLOUT_KEYS = ("eval/reward", "eval/reward_std", "eval/rewards/length/mean", "eval/kl",
                "eval/completions/mean_length", "eval/completions/eos_rate")
RECORDER = '''
import json

def length(prompts, completions, **columns):
  """Reward = characters of the completion; every call is appended to {log!r}."""
  texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
  with open({log!r}, "a") as f:
    f.write(json.dumps({{"prompts": [json.dumps(p) for p in prompts], "texts": texts}}) + "\\n")
  return [float(len(t)) for t in texts]
'''


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _quiet(config, workdir):
  config.workdir = str(workdir)
  config.metrics.progress_bar = False
  config.metrics.tensorboard = False
  return config


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
  """One grpo:tiny iteration with a reference (beta > 0), a reward that records what it scores,
  and the default evaluators (rollout; the task report is off to keep it short)."""
  root = tmp_path_factory.mktemp("grpo_evals")
  calls = root / "calls.jsonl"
  (root / "recorder.py").write_text(RECORDER.format(log=str(calls)))
  config = _quiet(configs.get("grpo:tiny"), root / "run")
  config.grpo.beta = 0.1
  config.reward.funcs = f"{root / 'recorder.py'}:length"
  config.report.task = ""
  config.max_steps = 1
  out = jaxpost.train(config)
  return {"out": out, "records": _records(root / "run"), "config": config,
          "calls": [json.loads(line) for line in calls.read_text().splitlines()]}


def _eval_record(records, step):
  (record,) = [r for r in records if r["step"] == step and "eval/reward" in r]
  return record


def test_rollout_evaluator_logs_reward_kl_and_lengths_before_and_after(grpo_run):
  records, out, config = grpo_run["records"], grpo_run["out"], grpo_run["config"]
  for step in (0, 1):
    record = _eval_record(records, step)
    assert set(ROLLOUT_KEYS) <= set(record)
    assert all(math.isfinite(record[k]) for k in ROLLOUT_KEYS)
    assert 1 <= record["eval/completions/mean_length"] <= config.rollout.max_new_tokens
    assert 0.0 <= record["eval/completions/eos_rate"] <= 1.0
  assert set(ROLLOUT_KEYS) <= set(out) and "eval/reward_before" in out
  assert not [k for r in records for k in r if k.startswith(("task/", "eval/loss"))]


def test_eval_kl_is_zero_while_the_policy_is_the_reference(grpo_run):
  before, after = (_eval_record(grpo_run["records"], s) for s in (0, 1))
  assert abs(before["eval/kl"]) < 1e-5
  assert abs(after["eval/kl"]) > 1e-6  # one update later the policy has moved


def test_eval_reward_is_the_mean_of_the_rewards_of_the_sampled_texts(grpo_run):
  """The first eval_batches reward calls are the step-0 evaluation (greedy: one completion per
  prompt, batch_size prompts a call), the last ones the final evaluation, on the same prompts."""
  config, calls = grpo_run["config"], grpo_run["calls"]
  n = config.eval_batches
  before, after = calls[:n], calls[-n:]
  assert [len(c["texts"]) for c in before + after] == [config.batch_size] * (2 * n)
  assert [c["prompts"] for c in before] == [c["prompts"] for c in after]  # same batches
  assert len(calls) == 2 * n + 1  # + the one training iteration
  for step, evaluation in ((0, before), (1, after)):
    rewards = np.array([len(t) for c in evaluation for t in c["texts"]], np.float64)
    record = _eval_record(grpo_run["records"], step)
    assert record["eval/reward"] == pytest.approx(rewards.mean(), rel=1e-6)
    assert record["eval/reward_std"] == pytest.approx(rewards.std(ddof=1), rel=1e-6)
    assert record["eval/rewards/length/mean"] == pytest.approx(rewards.mean(), rel=1e-6)


def _train(config):
  with pytest.raises(ConfigError) as err:
    jaxpost.train(config)
  return str(err.value)


def test_bad_evaluator_fails_naming_the_key_before_loading(tmp_path):
  config = _quiet(configs.get("sft:tiny"), tmp_path)
  config.model.name_or_path = str(tmp_path / "no_model_here")  # never reached
  config.evals = {"x": {"type": "bogus"}}
  assert "config.evals.x.type='bogus'" in _train(config)
  config.evals = {"x": {"type": "loss", "batchez": 2}}
  assert "config.evals.x.batchez is not a key of a 'loss' evaluator" in _train(config)
  config.evals = {"x": {"type": "rollout", "every": -1}}
  assert "config.evals.x.every=-1" in _train(config)
  grpo = _quiet(configs.get("grpo:tiny"), tmp_path)
  grpo.evals = {"held": {"type": "loss"}}
  assert "config.evals.held.type='loss'" in _train(grpo)


def test_two_loss_evaluators_run_each_at_its_own_interval(tmp_path):
  config = _quiet(configs.get("sft:tiny"), tmp_path)
  config.max_steps = 4
  config.evals = {"often": {"type": "loss", "every": 1, "batches": 1},
                  "rare": {"type": "loss", "every": 3, "batches": 1}}
  out = jaxpost.train(config)
  records = _records(tmp_path)
  steps = lambda key: [r["step"] for r in records if key in r]
  assert steps("eval/often/loss") == [0, 1, 2, 3, 4]
  assert steps("eval/rare/loss") == [0, 3, 4]  # before, every 3, and the end
  at3 = {k: v for r in records if r["step"] == 3 for k, v in r.items()}
  assert at3["eval/rare/loss"] == at3["eval/often/loss"]  # one loader, the same first batch
  assert "eval/often/perplexity" in out and not steps("task/accuracy")
