"""Prefix-shared rollout groups (algos/shared_groups.py): one [prompt | y_1 | ... | y_G] row per
group gives the per-row log-probs of the unshared rows, no completion sees another, and GRPO /
RLOO runs with data.prefix_sharing equal the unshared runs."""

import dataclasses

import jax
import numpy as np
import pytest

import jaxpost
from jaxpost.algos import shared_groups
from jaxpost.algos.rollout import RolloutConfig, rows_logprobs, sample_rollout
from tests.test_grpo import records, tiny_config
from tests.test_rollout import G, N, PROMPTS, batch, full_forward_logprobs, lm  # noqa: F401


@pytest.fixture(scope="module")
def sampled(lm, batch):
  config = RolloutConfig(num_generations=G, max_new_tokens=N, temperature=1.0)
  out = sample_rollout(lm.model, lm.params, batch, jax.random.PRNGKey(3), config)
  return config, out


def rows_of(out):
  return {"input_ids": out.input_ids, "attention_mask": out.attention_mask,
          "positions": out.positions, "completion_mask": out.completion_mask}


def test_shared_rows_hold_each_prompt_once_and_every_completion(sampled):
  config, out = sampled
  shared, slots = jax.device_get(shared_groups.shared_rows(rows_of(out), G, N))
  out = jax.device_get(out)
  width = out.input_ids.shape[1] + (G - 1) * N
  assert shared["input_ids"].shape == (len(PROMPTS), width) and slots.shape == (len(PROMPTS), G,
                                                                              width - (G - 1) * N)
  lengths = out.completion_lengths.reshape(-1, G)
  prompt_len = (out.attention_mask.sum(-1) - out.completion_lengths).reshape(-1, G)[:, 0]
  np.testing.assert_array_equal(shared["attention_mask"].sum(-1), prompt_len + lengths.sum(-1))
  for i in range(len(PROMPTS)):
    for j in range(G):
      r = i * G + j
      real = out.attention_mask[r] > 0
      np.testing.assert_array_equal(shared["input_ids"][i, slots[i, j][real]], out.input_ids[r][real])
      np.testing.assert_array_equal(shared["positions"][i, slots[i, j][real]], out.positions[r][real])
      completion = out.completion_mask[r] > 0
      assert (shared["branch_ids"][i, slots[i, j][completion]] == j + 1).all()
      assert (shared["branch_ids"][i, slots[i, j][real & ~completion]] == 0).all()


def test_shared_logprobs_equal_unshared_and_a_full_forward(lm, sampled):
  config, out = sampled
  unshared = rows_logprobs(lm.model, lm.params, rows_of(out), config)
  shared = rows_logprobs(lm.model, lm.params, rows_of(out),
                         dataclasses.replace(config, prefix_sharing=True))
  np.testing.assert_allclose(shared, unshared, atol=1e-5)
  np.testing.assert_allclose(shared, full_forward_logprobs(lm, jax.device_get(out), 1.0), atol=1e-5)
  assert np.abs(np.asarray(shared)).sum() > 0


def test_narrowed_rows_give_the_same_logprobs(lm, sampled):
  """Shared rows as wide as the sampled completions need (`completion_slots`) lose nothing."""
  config, out = sampled
  lengths = np.asarray(out.completion_lengths)
  slots = shared_groups.completion_slots(lengths, G, N)
  assert slots >= lengths.reshape(-1, G).sum(-1).max() and slots % -(-G * N // 4) in (0, G * N)
  assert shared_groups.completion_slots(np.ones(2 * G, int), G, N) == -(-G * N // 4)
  assert shared_groups.completion_slots(np.full(2 * G, N), G, N) == G * N
  full = dataclasses.replace(config, prefix_sharing=True)
  narrowed = dataclasses.replace(full, completion_slots=slots)
  np.testing.assert_allclose(rows_logprobs(lm.model, lm.params, rows_of(out), narrowed),
                             rows_logprobs(lm.model, lm.params, rows_of(out), full), atol=1e-6)
  shared, _ = shared_groups.shared_rows(rows_of(out), G, N, slots_after_prompt=slots)
  assert shared["input_ids"].shape[1] == out.input_ids.shape[1] - N + slots


def test_no_completion_sees_another(lm, sampled):
  """Rewriting completion j = 1 of every group changes its own log-probs only."""
  config, out = sampled
  config = dataclasses.replace(config, prefix_sharing=True)
  rows = rows_of(out)
  before = np.asarray(rows_logprobs(lm.model, lm.params, rows, config))
  ids = np.asarray(out.input_ids).copy()
  mine = (np.arange(ids.shape[0]) % G == 1)[:, None] & (np.asarray(out.completion_mask) > 0)
  ids[mine] = (ids[mine] + 17) % lm.config.vocab_size
  after = np.asarray(rows_logprobs(lm.model, lm.params, {**rows, "input_ids": ids}, config))
  others = np.arange(ids.shape[0]) % G != 1
  np.testing.assert_allclose(after[others], before[others], atol=1e-6)
  assert np.abs(after[~others] - before[~others]).max() > 1e-3


@pytest.mark.parametrize("recipe,overrides", [
    ("grpo:tiny", {"grpo.num_iterations": 2, "grpo.beta": 0.05, "grad_accum": 2,
                   "grpo.loss_type": "grpo"}),
    ("rloo:tiny", {"rloo.beta": 0.05}),
], ids=["grpo_mu2_beta_accum", "rloo_beta"])
def test_runs_equal_unshared(tmp_path, recipe, overrides):
  """Two iterations, shared vs unshared: the same samples, losses, gradients and KL (π_old
  recompute, reference pass and update all shared)."""
  for name, sharing in (("shared", True), ("unshared", False)):
    jaxpost.train(tiny_config(tmp_path, recipe=recipe, name=name, max_steps=2,
                              **{"checkpoint.every": 0, "data.prefix_sharing": sharing,
                                 **overrides}))
  shared, unshared = records(tmp_path / "shared"), records(tmp_path / "unshared")
  assert len(shared) == len(unshared) == 2
  for a, b in zip(shared, unshared):
    assert a["completions/mean_length"] == b["completions/mean_length"]
    for key in ("loss", "grad_norm", "kl", "entropy", "param_norm", "clip_ratio/region_mean"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
  assert shared[-1]["kl"] > 0 and shared[0]["grad_norm"] > 0
  c = jaxpost.configs.get(recipe)
  g, n = c[recipe.split(":")[0]].num_generations, c.rollout.max_new_tokens
  for r in shared:  # narrowed to the sampled lengths, never short of them
    assert r["completions/max_length"] <= r["update/completion_slots"] <= min(
        g * n, g * r["completions/max_length"] + -(-g * n // 4))
  widths = [r["update/completion_slots"] for r in shared]
  for i, r in enumerate(shared):  # a new width is compiled ahead of its call, timed apart
    assert "time/compile" in r or widths[i] in widths[:i], (i, widths)
  update_flops = lambda r: r["mfu/update"] * r["time/update"]  # x peak: counted as laid out
  assert update_flops(shared[0]) < update_flops(unshared[0])
