"""GRPO family and RLOO math against values computed by hand, plus edge cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses import grpo
from jaxpost.losses.grpo import GRPOConfig

EPS = grpo.STD_EPS
f32 = lambda x: jnp.asarray(x, jnp.float32)

# Two groups of G = 3: means 2 and 1, unbiased stds 1 and sqrt(3); the six rewards have mean 1.5
# and unbiased std sqrt(9.5 / 5).
REWARDS = [1.0, 2.0, 3.0, 0.0, 0.0, 3.0]
CENTRED = [-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_by_hand(scale):
  adv, m = grpo.group_advantages(f32(REWARDS), 3, scale_rewards=scale)
  divisor = {"group": [1.0 + EPS] * 3 + [math.sqrt(3) + EPS] * 3,
             "batch": [math.sqrt(9.5 / 5) + EPS] * 6, "none": [1.0] * 6}[scale]
  np.testing.assert_allclose(adv, np.divide(CENTRED, divisor), rtol=1e-6)
  assert float(m["reward"]) == pytest.approx(1.5)
  assert float(m["reward_std"]) == pytest.approx(math.sqrt(9.5 / 5), rel=1e-6)
  # [B, G] input gives the same values in its own shape.
  adv2, _ = grpo.group_advantages(f32(REWARDS).reshape(2, 3), 3, scale_rewards=scale)
  np.testing.assert_array_equal(adv2, np.asarray(adv).reshape(2, 3))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_zero_advantage_and_no_nan(scale):
  rewards = f32([5.0, 5.0, 5.0, 0.0, 1.0, 0.0])
  adv, m = grpo.group_advantages(rewards, 3, scale_rewards=scale)
  assert bool(jnp.all(jnp.isfinite(adv)))
  np.testing.assert_array_equal(adv[:3], 0.0)
  assert float(m["frac_reward_zero_std"]) == (0.5 if scale != "batch" else 0.0)
  adv, m = grpo.group_advantages(jnp.full((6,), 2.0), 3, scale_rewards=scale)
  np.testing.assert_array_equal(adv, 0.0)
  assert float(m["frac_reward_zero_std"]) == 1.0


def test_invalid_rewards_are_excluded_and_get_zero_advantage():
  # Group 1: valid 1 and 3 (NaN = None, 100 flagged invalid): mean 2, std sqrt(2).
  # Group 2: a single valid reward -> advantage 0; its std is undefined, not zero.
  rewards = f32([1.0, jnp.nan, 3.0, 100.0, 7.0, jnp.nan, jnp.nan, jnp.nan])
  valid = jnp.asarray([True, True, True, False, True, True, True, True])
  adv, m = grpo.group_advantages(rewards, 4, valid=valid)
  s = math.sqrt(2) + EPS
  np.testing.assert_allclose(adv, [-1 / s, 0, 1 / s, 0, 0, 0, 0, 0], rtol=1e-6)
  assert float(m["reward"]) == pytest.approx((1 + 3 + 7) / 3)
  assert float(m["frac_reward_zero_std"]) == 0.0
  jitted = jax.jit(grpo.group_advantages, static_argnums=(1,))
  np.testing.assert_array_equal(jitted(rewards, 4, valid)[0], adv)


def test_dynamic_sampling_mask():
  rewards = f32([1, 1, 1, 0, 1, 0, 2, jnp.nan, 2, 3, jnp.nan, jnp.nan])
  keep = grpo.dynamic_sampling_mask(rewards, 3)
  np.testing.assert_array_equal(keep, [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0])
  # Invalidating the odd reward of group 2 leaves equal valid rewards: dropped.
  valid = jnp.ones(12, bool).at[4].set(False)
  assert not bool(jnp.any(grpo.dynamic_sampling_mask(rewards, 3, valid)))


def test_overlong_penalty_by_hand():
  # L = 10, C = 4: soft zone (6, 10].
  np.testing.assert_allclose(grpo.overlong_penalty(f32([3, 6, 7, 8, 10, 11]), 10, 4),
                             [0, 0, -0.25, -0.5, -1.0, -1.0])
  np.testing.assert_array_equal(grpo.overlong_penalty(f32([10, 11]), 10, 0), [0.0, -1.0])


def test_truncated_completions_mask():
  ids = jnp.asarray([[5, 2, 0], [5, 6, 7], [5, 6, 2]])
  mask = f32([[1, 1, 0], [1, 1, 1], [1, 1, 0]])  # row 3's EOS lies outside its mask
  finished = grpo.completion_finished(ids, mask, [2, 9])
  np.testing.assert_array_equal(finished, [True, False, False])
  np.testing.assert_array_equal(grpo.mask_truncated_completions(mask, finished),
                                [[1, 1, 0], [0, 0, 0], [0, 0, 0]])


def test_rloo_baseline_by_hand():
  # [1, 2, 6]: baselines 4, 3.5, 1.5. [1, None, 6, 3]: baselines 4.5, -, 2, 3.5.
  np.testing.assert_allclose(grpo.rloo_advantages(f32([1, 2, 6]), 3), [-3.0, -1.5, 4.5])
  adv = grpo.rloo_advantages(f32([1, jnp.nan, 6, 3, 4, jnp.nan, jnp.nan, jnp.nan]), 4)
  np.testing.assert_allclose(adv, [-3.5, 0, 4, -0.5, 0, 0, 0, 0])
  norm = grpo.rloo_advantages(f32([1, jnp.nan, 6, 3, 4, jnp.nan, jnp.nan, jnp.nan]), 4,
                              normalize=True)
  std = np.std([-3.5, 4, -0.5], ddof=1)
  np.testing.assert_allclose(norm, [-3.5 / (std + EPS), 0, 4 / (std + EPS), -0.5 / (std + EPS),
                                    0, 0, 0, 0], rtol=1e-5)


def test_rloo_rewards_k1_penalty():
  old = f32([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
  ref = f32([[-1.5, -1.0, 0.0], [-0.5, -1.0, -2.0]])
  mask = f32([[1, 1, 0], [1, 1, 1]])
  rewards, m = grpo.rloo_rewards(f32([1.0, 2.0]), old, ref, mask, beta=0.5)
  # Σ m (old - ref) = 0.5 - 1.0 = -0.5 and 0 + 0.5 + 1.5 = 2.0.
  np.testing.assert_allclose(rewards, [1.0 + 0.25, 2.0 - 1.0])
  assert float(m["kl"]) == pytest.approx((-0.5 + 2.0) / 5)


LOGPS = f32([[-0.5, -1.0, -3.0], [-0.2, -2.0, -0.7]])
MASK = f32([[1, 1, 0], [1, 1, 1]])
ADV = f32([1.0, -3.0])
# With ρ = 1 the token losses are -A: row sums -2 and 9 over 2 and 3 tokens.
RATIO_ONE = {"grpo": (-1.0 + 3.0) / 2, "bnpo": 7 / 5, "dapo": 7 / 10, "dr_grpo": 7 / (2 * 4)}
# d loss / d log π_it = -A_i m_it / normaliser_i.
GRAD_DIVISOR = {"grpo": [[4.0], [6.0]], "bnpo": 5.0, "dapo": 10.0, "dr_grpo": 8.0}


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("level", grpo.IMPORTANCE_SAMPLING_LEVELS)
def test_ratio_one_loss_gradient_and_clip_metrics(loss_type, level):
  cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, max_completion_length=4)
  fn = jax.jit(lambda lp, old: grpo.grpo_loss(cfg, lp, ADV, MASK, old_logps=old,
                                               num_items_in_batch=10.0))
  for old in (None, LOGPS):
    loss, m = fn(LOGPS, old)
    assert float(loss) == pytest.approx(RATIO_ONE[loss_type], rel=1e-6)
    assert all(float(m[f"clip_ratio/{k}"]) == 0.0
               for k in ("low_mean", "high_mean", "region_mean", "low_min", "high_max"))
  grad = jax.grad(lambda lp: fn(lp, LOGPS)[0])(LOGPS)
  want = -np.asarray(ADV)[:, None] * np.asarray(MASK) / np.asarray(GRAD_DIVISOR[loss_type])
  np.testing.assert_allclose(grad, want, rtol=1e-6)
  if loss_type == "grpo":  # the plain mean of -A over the sequences
    assert float(fn(LOGPS, None)[0]) == pytest.approx(-float(jnp.mean(ADV)))


def test_clipping_and_clip_metrics():
  cfg = GRPOConfig(loss_type="bnpo", epsilon=0.2)
  adv = f32([[1.0, 1.0, -1.0, -2.0]])
  ratio = f32([[1.5, 1.1, 0.5, 1.5]])
  logps = f32([[-1.0, -1.0, -1.0, -1.0]])
  old = logps - jnp.log(ratio)
  mask = jnp.ones((1, 4))
  loss, m = grpo.grpo_loss(cfg, logps, adv, mask, old_logps=old)
  # token losses: -min(1.5, 1.2) = -1.2 (high clip), -1.1, -min(-0.5, -0.8) = 0.8 (low clip),
  # -min(-3, -2.4) = 3 (outside the region but not clipped: A < 0 with ρ > 1).
  assert float(loss) == pytest.approx((-1.2 - 1.1 + 0.8 + 3.0) / 4, rel=1e-6)
  assert float(m["clip_ratio/high_mean"]) == 0.25 and float(m["clip_ratio/low_mean"]) == 0.25
  assert float(m["clip_ratio/region_mean"]) == 0.5
  grad = jax.grad(lambda lp: grpo.grpo_loss(cfg, lp, adv, mask, old_logps=old)[0])(logps)
  np.testing.assert_allclose(grad, [[0.0, -1.1 / 4, 0.0, 3.0 / 4]], rtol=1e-6)
  # epsilon_high widens the upper bound only.
  _, m = grpo.grpo_loss(GRPOConfig(loss_type="bnpo", epsilon_high=0.6), logps, adv, mask,
                        old_logps=old)
  assert float(m["clip_ratio/high_mean"]) == 0.0 and float(m["clip_ratio/low_mean"]) == 0.25


def test_gspo_sequence_ratio_by_hand():
  logps = f32([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
  old = logps - f32([[0.2, 0.4, 5.0], [-0.1, 0.0, 0.0]])  # row 1's masked token is ignored
  mask = f32([[1, 1, 0], [1, 0, 0]])
  s = [math.exp(0.3), math.exp(-0.1)]
  adv = f32([1.0, 1.0])
  cfg = GRPOConfig(loss_type="grpo", importance_sampling_level="sequence", epsilon_high=0.4)
  loss, m = grpo.grpo_loss(cfg, logps, adv, mask, old_logps=old)
  assert float(loss) == pytest.approx(-(s[0] + s[1]) / 2, rel=1e-6)
  grad = jax.grad(lambda lp: grpo.grpo_loss(cfg, lp, adv, mask, old_logps=old)[0])(logps)
  # GSPO: d/d log π_t of -s_i / N_seq is -s_i / (|y_i| N_seq).
  np.testing.assert_allclose(grad, [[-s[0] / 4, -s[0] / 4, 0], [-s[1] / 2, 0, 0]], rtol=1e-6)
  # With ε_high = 0.2 row 0 (s = 1.35) clips: metrics count sequences, not tokens.
  cfg = GRPOConfig(loss_type="grpo", importance_sampling_level="sequence")
  loss, m = grpo.grpo_loss(cfg, logps, adv, mask, old_logps=old)
  assert float(loss) == pytest.approx(-(1.2 + s[1]) / 2, rel=1e-6)
  assert float(m["clip_ratio/high_mean"]) == 0.5 and float(m["clip_ratio/high_max"]) == 1.0


@pytest.mark.parametrize("correction", [True, False])
def test_kl_term(correction):
  ref = LOGPS + f32([[1.0, -0.5, 0.0], [0.0, 0.3, -1.0]])
  cfg = GRPOConfig(loss_type="bnpo", beta=0.1, use_bias_correction_kl=correction)
  fn = lambda lp: grpo.grpo_loss(cfg, lp, ADV, MASK, old_logps=LOGPS, ref_logps=ref)
  loss, m = fn(LOGPS)
  delta = np.asarray(ref - LOGPS)
  k3 = np.exp(delta) - delta - 1
  mean_k3 = float((k3 * np.asarray(MASK)).sum() / 5)
  assert float(m["kl"]) == pytest.approx(mean_k3, rel=1e-6)
  assert float(loss) == pytest.approx(RATIO_ONE["bnpo"] + 0.1 * mean_k3, rel=1e-6)
  # d(β w k3)/d log π at ρ = 1: β (1 - e^Δ), plus β k3 through w = ρ with the correction.
  kl_grad = 0.1 * ((1 - np.exp(delta)) + (k3 if correction else 0.0)) * np.asarray(MASK) / 5
  policy_grad = -np.asarray(ADV)[:, None] * np.asarray(MASK) / 5
  np.testing.assert_allclose(jax.grad(lambda lp: fn(lp)[0])(LOGPS), policy_grad + kl_grad,
                             rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="ref_logps"):
    grpo.grpo_loss(cfg, LOGPS, ADV, MASK)


def test_num_sequences_and_entropy_metric():
  cfg = GRPOConfig(loss_type="grpo")
  loss, m = grpo.grpo_loss(cfg, LOGPS, ADV, MASK, entropy=f32([[1, 2, 9], [3, 4, 5]]),
                           num_sequences=4)
  assert float(loss) == pytest.approx(2.0 / 4)
  assert float(m["entropy"]) == pytest.approx(15 / 5)


def test_rloo_loss_by_hand():
  logps = f32([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
  old = logps - f32([[0.1, 0.2, 7.0], [-0.5, 0.0, 0.0]])
  mask = f32([[1, 1, 0], [1, 1, 1]])
  adv = f32([1.0, -1.0])
  loss, m = grpo.rloo_loss(logps, old, adv, mask)
  # ρ = e^0.3 > 1.2 (A > 0: high clip, -1.2); ρ = e^-0.5 < 0.8 (A < 0: low clip, 0.8).
  assert float(loss) == pytest.approx((-1.2 + 0.8) / 2, rel=1e-6)
  assert float(m["clip_ratio/low_mean"]) == 0.5 and float(m["clip_ratio/high_mean"]) == 0.5
  assert float(m["clip_ratio/region_mean"]) == 1.0
  # ρ = 1: d loss / d log π_t = -A_i / B on every completion token (a sum, not a mean).
  grad = jax.grad(lambda lp: grpo.rloo_loss(lp, logps, adv, mask)[0])(logps)
  np.testing.assert_allclose(grad, -np.asarray(adv)[:, None] * np.asarray(mask) / 2)


def test_config_validation_names_the_key():
  with pytest.raises(ValueError, match="config.grpo.loss_type"):
    GRPOConfig(loss_type="ppo")
  with pytest.raises(ValueError, match="config.grpo.scale_rewards"):
    GRPOConfig(scale_rewards="batchwise")
  with pytest.raises(ValueError, match="config.grpo.num_generations"):
    GRPOConfig(num_generations=1)
  with pytest.raises(ValueError, match="config.grpo.overlong_buffer"):
    GRPOConfig(overlong_buffer=600, max_completion_length=512)
  assert GRPOConfig(epsilon=0.2, epsilon_high=0.28).epsilon_high == 0.28
  assert GRPOConfig(epsilon=0.3).epsilon_high == 0.3
  with pytest.raises(ValueError, match="num_generations=3"):
    grpo.group_advantages(f32([1, 2, 3, 4]), 3)


@pytest.mark.parametrize("level", grpo.IMPORTANCE_SAMPLING_LEVELS)
def test_updates_raise_the_reward_of_a_toy_policy(level):
  # A policy of T independent categoricals over V tokens; reward = fraction of token-0 draws.
  vocab, length, groups = 4, 6, 8
  cfg = GRPOConfig(num_generations=groups, importance_sampling_level=level)

  @jax.jit
  def step(logits, key):
    tokens = jax.random.categorical(key, logits, shape=(2 * groups, length))
    rewards = jnp.mean((tokens == 0).astype(jnp.float32), axis=1)
    adv, metrics = grpo.group_advantages(rewards, groups)
    token_logps = lambda lg: jnp.take_along_axis(jax.nn.log_softmax(lg)[None], tokens[..., None],
                                                 axis=-1)[..., 0]
    loss = lambda lg: grpo.grpo_loss(cfg, token_logps(lg), adv, jnp.ones(tokens.shape))[0]
    return logits - 2.0 * jax.grad(loss)(logits), metrics["reward"]

  logits, rewards = jnp.zeros((length, vocab)), []
  for key in jax.random.split(jax.random.PRNGKey(0), 40):
    logits, reward = step(logits, key)
    rewards.append(float(reward))
  assert np.mean(rewards[:5]) < 0.4 and np.mean(rewards[-5:]) > 0.7, rewards
