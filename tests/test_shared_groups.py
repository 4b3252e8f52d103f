"""Prefix-shared rollout groups (algos/shared_groups.py): [prompt | y_1 | ... | y_G] groups, one or
k packed to a row, give the per-row log-probs of the unshared rows, no completion sees another nor
a group another group, and GRPO / RLOO runs with data.prefix_sharing equal the unshared runs."""

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


def full(out, k=1):
  return shared_groups.full_width(out.input_ids.shape[1] - N, G, N, k)


@pytest.mark.parametrize("k", [1, 2])
def test_shared_rows_hold_each_prompt_once_and_every_completion(sampled, k):
  """Group i sits in shared row i // k, as segment i % k + 1 (when k > 1), its prompt once and
  every completion j as branch j + 1, at the slots `slots` names."""
  config, out = sampled
  shared, slots = jax.device_get(shared_groups.shared_rows(rows_of(out), G, full(out, k),
                                                           groups_per_row=k))
  out = jax.device_get(out)
  rows = len(PROMPTS) // k
  assert shared["input_ids"].shape == (rows, full(out, k))
  assert slots.shape == (rows, k * G, out.input_ids.shape[1])
  assert ("segment_ids" in shared) == (k > 1)
  lengths = out.completion_lengths.reshape(-1, G)
  prompt_len = (out.attention_mask.sum(-1) - out.completion_lengths).reshape(-1, G)[:, 0]
  group_len = (prompt_len + lengths.sum(-1)).reshape(rows, k)
  np.testing.assert_array_equal(shared["attention_mask"].sum(-1), group_len.sum(-1))
  for i in range(len(PROMPTS)):
    for j in range(G):
      r = i * G + j
      row = slots[i // k, (i % k) * G + j]
      real = out.attention_mask[r] > 0
      np.testing.assert_array_equal(shared["input_ids"][i // k, row[real]], out.input_ids[r][real])
      np.testing.assert_array_equal(shared["positions"][i // k, row[real]], out.positions[r][real])
      completion = out.completion_mask[r] > 0
      assert (shared["branch_ids"][i // k, row[completion]] == j + 1).all()
      assert (shared["branch_ids"][i // k, row[real & ~completion]] == 0).all()
      if k > 1:
        assert (shared["segment_ids"][i // k, row[real]] == i % k + 1).all()
  padding = np.arange(full(out, k))[None] >= group_len.sum(-1)[:, None]
  assert (shared["attention_mask"][padding] == 0).all()  # the padding only at the row's end


@pytest.mark.parametrize("k", [1, 2])
def test_shared_logprobs_equal_unshared_and_a_full_forward(lm, sampled, k):
  config, out = sampled
  unshared = rows_logprobs(lm.model, lm.params, rows_of(out), config)
  shared = rows_logprobs(lm.model, lm.params, rows_of(out),
                         dataclasses.replace(config, prefix_sharing=True, groups_per_row=k))
  np.testing.assert_allclose(shared, unshared, atol=1e-5)
  np.testing.assert_allclose(shared, full_forward_logprobs(lm, jax.device_get(out), 1.0), atol=1e-5)
  assert np.abs(np.asarray(shared)).sum() > 0


def test_row_layout_balances_rows_and_narrows_to_the_fullest():
  """Four groups of 100, 60, 50, 10 tokens on two rows of two: {100, 10} and {60, 50}; the
  fullest row (110) rounds up to 128 (WIDTH_STEP), never past the full width."""
  prompts, g = np.array([40, 20, 30, 4]), 2
  completions = np.array([30, 30, 20, 20, 10, 10, 3, 3])
  order, width, fill = shared_groups.row_layout(prompts, completions, g, 2, max_width=2048)
  assert [set(order[:2]), set(order[2:])] == [{0, 3}, {1, 2}]
  assert width == 128 and fill == pytest.approx(220 / 256)
  assert shared_groups.row_layout(prompts, completions, g, 2, max_width=100)[1] == 100
  step = -(-4096 // shared_groups.MAX_WIDTHS)  # a wide row rounds to 1/16 of its full width
  assert shared_groups.row_layout(prompts, completions, g, 2, max_width=4096)[1] == step
  assert shared_groups.groups_per_row(8, 600) == 2 and shared_groups.groups_per_row(6, 500) == 3
  assert shared_groups.groups_per_row(3, 4000) == 1


def test_laid_out_rows_give_the_same_logprobs(lm, sampled):
  """Groups in `row_layout`'s order, packed two to a row as narrow as their lengths need: the
  log-probs are the unshared rows' in that order."""
  config, out = sampled
  rows = shortened(rows_of(out), 3)
  lengths = rows["completion_mask"].sum(-1)
  prompts = (rows["attention_mask"].sum(-1) - lengths)[::G]
  order, width, _ = shared_groups.row_layout(prompts, lengths, G, 2, full(out, 2))
  assert width < full(out, 2)
  order = order[::-1].copy()  # any order of the groups holds (this row is balanced either way)
  ordered = shared_groups.in_row_order(rows, order, G)
  packed = dataclasses.replace(config, prefix_sharing=True, groups_per_row=2, shared_width=width)
  expected = shared_groups.in_row_order(rows_logprobs(lm.model, lm.params, rows, config), order, G)
  np.testing.assert_allclose(rows_logprobs(lm.model, lm.params, ordered, packed), expected,
                             atol=1e-5)


def shortened(rows, n):
  """`rows` with each completion cut to its first n tokens (as if it stopped there)."""
  completion = np.asarray(rows["completion_mask"])
  kept = completion * (np.cumsum(completion, axis=1) <= n)
  attention = np.asarray(rows["attention_mask"]) - completion + kept
  return {**jax.device_get(rows), "completion_mask": kept, "attention_mask": attention}


@pytest.mark.parametrize("k", [1, 2])
def test_no_completion_sees_another(lm, sampled, k):
  """Rewriting completion j = 1 of every group changes its own log-probs only; with two groups
  to a row, rewriting group 0 whole (prompt too) leaves group 1's."""
  config, out = sampled
  config = dataclasses.replace(config, prefix_sharing=True, groups_per_row=k)
  rows = rows_of(out)
  before = np.asarray(rows_logprobs(lm.model, lm.params, rows, config))
  ids = np.asarray(out.input_ids).copy()
  row = np.arange(ids.shape[0])
  mine = (row % G == 1)[:, None] & (np.asarray(out.completion_mask) > 0)
  if k > 1:
    mine = (row < G)[:, None] & (np.asarray(out.attention_mask) > 0)
  ids[mine] = (ids[mine] + 17) % lm.config.vocab_size
  after = np.asarray(rows_logprobs(lm.model, lm.params, {**rows, "input_ids": ids}, config))
  others = ~mine.any(-1)
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
  for r in shared:  # packed rows, narrowed to the sampled lengths
    assert 0 < r["update/shared_fill"] <= 1
  widths = [r["update/shared_width"] for r in shared]
  for i, r in enumerate(shared):  # a new width is compiled ahead of its call, timed apart
    assert "time/compile" in r or widths[i] in widths[:i], (i, widths)
  update_flops = lambda r: r["mfu/update"] * r["time/update"]  # x peak: counted as laid out
  assert update_flops(shared[0]) < update_flops(unshared[0])
