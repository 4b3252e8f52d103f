"""PPO-RLHF math (jaxpost/losses/ppo.py) against values computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses import ppo
from jaxpost.losses.kl import KLController

f32 = lambda x: jnp.asarray(x, jnp.float32)
# One row: a prompt position (mask 0), four completion tokens, one padding position. The masked
# positions hold junk that must not leak into the completion's advantages.
MASK = f32([[0, 1, 1, 1, 1, 0]])
REWARDS = f32([[7.0, 0.0, 0.0, 0.0, 1.0, 9.0]])
VALUES = f32([[5.0, 0.5, 0.4, 0.3, 0.2, 4.0]])


def test_gae_four_tokens_by_hand():
  """γ = 0.9, λ = 0.8: δ_3 = 1 − 0.2; δ_2 = 0.9·0.2 − 0.3; δ_1 = 0.9·0.3 − 0.4; δ_0 = 0.9·0.4 − 0.5,
  A_t = δ_t + 0.72 A_{t+1}."""
  adv, ret = ppo.gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
  a3 = 0.8
  a2 = -0.12 + 0.72 * a3
  a1 = -0.13 + 0.72 * a2
  a0 = -0.14 + 0.72 * a1
  np.testing.assert_allclose(adv[0], [0, a0, a1, a2, a3, 0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ret[0], [0, a0 + 0.5, a1 + 0.4, a2 + 0.3, a3 + 0.2, 0], rtol=1e-6,
                             atol=1e-7)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
  rng = np.random.default_rng(0)
  rewards, values = f32(rng.normal(size=(3, 7))), f32(rng.normal(size=(3, 7)))
  mask = f32([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0]])
  adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
  m = np.asarray(mask)
  r = np.asarray(rewards) * m
  to_go = np.cumsum(r[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(adv, (to_go - np.asarray(values)) * m, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ret, to_go * m, rtol=1e-5, atol=1e-6)


def test_token_rewards_kl_and_score_at_the_last_token():
  logps = f32([[0.0, -1.0, -2.0, -0.5, -1.5, 0.0]])
  ref = f32([[3.0, -1.5, -1.0, -0.5, -2.5, 5.0]])
  r, kl = ppo.token_rewards(f32([2.0]), logps, ref, MASK, 0.1, "k1")
  k1 = np.array([0, 0.5, -1.0, 0.0, 1.0, 0])
  np.testing.assert_allclose(kl[0], k1, atol=1e-7)
  np.testing.assert_allclose(r[0], -0.1 * k1 + np.array([0, 0, 0, 0, 2.0, 0]), atol=1e-7)
  _, kl3 = ppo.token_rewards(f32([2.0]), logps, ref, MASK, 0.1, "k3")
  delta = -k1
  np.testing.assert_allclose(kl3[0], (np.exp(delta) - delta - 1) * np.asarray(MASK[0]), atol=1e-6)
  r0, kl0 = ppo.token_rewards(f32([2.0]), logps, None, MASK, 0.1)
  np.testing.assert_array_equal(kl0, 0.0)
  np.testing.assert_allclose(r0[0], [0, 0, 0, 0, 2.0, 0])


def test_shape_scores_penalty_then_clip():
  scores = ppo.shape_scores(f32([3.0, 3.0, -0.5]), jnp.array([True, False, False]),
                            missing_eos_penalty=1.0, reward_clip=2.5)
  np.testing.assert_allclose(scores, [2.5, 2.0, -1.5])


def test_masked_whiten_by_hand():
  x = f32([[9.0, 1.0, 2.0, 3.0, 4.0, -9.0]])
  white = ppo.masked_whiten(x, MASK)
  mean, var = 2.5, np.var([1, 2, 3, 4], ddof=1)  # 5/3
  expected = (np.array([1, 2, 3, 4]) - mean) / math.sqrt(var + 1e-8)
  np.testing.assert_allclose(white[0, 1:5], expected, rtol=1e-6)
  np.testing.assert_allclose(ppo.masked_whiten(x, MASK, shift_mean=False)[0, 1:5],
                             expected + mean, rtol=1e-6)
  assert float(ppo.masked_mean(white, MASK)) == pytest.approx(0.0, abs=1e-6)


def test_clipped_surrogate_by_hand():
  """ε = 0.2: ρ = e^½ with A = 1 clips to 1.2; ρ = e^−½ with A = 1 does not (the unclipped term
  is larger); ρ = e^½ with A = −2 keeps the unclipped 2 e^½ (pessimistic), which dual clip 1.5
  caps at 3; ρ = 1 gives −A."""
  old = f32([[0.0, 0.0, 0.0, 0.0]])
  logps = f32([[0.5, -0.5, 0.5, 0.0]])
  adv = f32([[1.0, 1.0, -2.0, 0.5]])
  mask = f32([[1, 1, 1, 1]])
  e = math.exp(0.5)
  terms = [-1.2, -1 / e, 2 * e, -0.5]
  loss, m = ppo.policy_loss(logps, old, adv, mask, 0.2)
  assert float(loss) == pytest.approx(np.mean(terms), rel=1e-6)
  assert float(m["policy/clipfrac_avg"]) == pytest.approx(0.25)
  assert float(m["policy/approxkl_avg"]) == pytest.approx(0.5 * 0.75 / 4 * 1.0, rel=1e-6)
  assert float(m["val/ratio"]) == pytest.approx((e + 1 / e + e + 1) / 4, rel=1e-6)
  dual, _ = ppo.policy_loss(logps, old, adv, mask, 0.2, dual_clip=1.5)
  assert float(dual) == pytest.approx(np.mean([-1.2, -1 / e, 3.0, -0.5]), rel=1e-6)


def test_first_update_ratio_one_no_clipping():
  logps = f32(np.random.default_rng(1).normal(size=(2, 5)))
  adv = f32(np.random.default_rng(2).normal(size=(2, 5)))
  loss, m = ppo.policy_loss(logps, logps, adv, jnp.ones((2, 5)), 0.2)
  assert float(m["val/ratio"]) == 1.0 and float(m["policy/clipfrac_avg"]) == 0.0
  assert float(loss) == pytest.approx(-float(jnp.mean(adv)), rel=1e-6)


def test_entropy_bonus_by_hand():
  """L = w (L_pg − c_H mean_m H) + vf_coef L_v: the bonus lowers the loss by w c_H mean_m H and
  its gradient in H is −w c_H m / Σ m; entropy off the mask does not count."""
  rng = np.random.default_rng(3)
  mask = f32([[0, 1, 1, 1], [0, 1, 1, 0]])
  batch = {"loss_mask": mask, "old_logps": f32(rng.normal(size=(2, 4))),
           "advantages": f32(rng.normal(size=(2, 4))), "old_values": f32(rng.normal(size=(2, 4))),
           "returns": f32(rng.normal(size=(2, 4)))}
  logps, values = batch["old_logps"] + 0.1, batch["old_values"] - 0.1
  entropy = f32([[9.0, 1.0, 2.0, 3.0], [9.0, 4.0, 5.0, 9.0]])  # 9: off the mask
  loss = lambda c, h: ppo.ppo_loss(ppo.PPOConfig(ent_coef=c), logps, values, batch, h, 0.5)[0]
  assert float(loss(0.2, entropy)) == pytest.approx(float(loss(0.0, entropy)) - 0.5 * 0.2 * 3.0,
                                                    rel=1e-6)
  np.testing.assert_allclose(jax.grad(lambda h: loss(0.2, h))(entropy), -0.5 * 0.2 * mask / 5,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="ent_coef > 0 needs the policy's entropy"):
    loss(0.2, None)


def test_value_clipping_engages_past_eps_v():
  """V_old = 0, R̂ = 1, ε_v = 0.2: V = 0.1 is inside (0.81 both); V = 0.5 clips to 0.2 and the
  clipped 0.64 > 0.25 wins; V = −0.5 clips to −0.2 but the unclipped 2.25 > 1.44 wins."""
  values, old, ret = f32([[0.1, 0.5, -0.5]]), f32([[0.0, 0.0, 0.0]]), f32([[1.0, 1.0, 1.0]])
  loss, m = ppo.value_loss(values, old, ret, jnp.ones((1, 3)), 0.2)
  assert float(loss) == pytest.approx(0.5 * (0.81 + 0.64 + 2.25) / 3, rel=1e-6)
  assert float(m["val/clipfrac_avg"]) == pytest.approx(1 / 3)
  inside, m_in = ppo.value_loss(values, values, ret, jnp.ones((1, 3)), 0.2)
  assert float(m_in["val/clipfrac_avg"]) == 0.0
  assert float(inside) == pytest.approx(0.5 * (0.81 + 0.25 + 2.25) / 3, rel=1e-6)


def test_explained_variance():
  ret = f32([[1.0, 2.0, 3.0, 4.0]])
  mask = jnp.ones((1, 4))
  assert float(ppo.explained_variance(ret, ret, mask)) == pytest.approx(1.0)
  assert float(ppo.explained_variance(jnp.full((1, 4), 2.5), ret, mask)) == pytest.approx(0.0)


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match=r"config.ppo.kl_estimator='k2'"):
    ppo.PPOConfig(kl_estimator="k2")
  with pytest.raises(ValueError, match=r"config.ppo.lam=1.5"):
    ppo.PPOConfig(lam=1.5)
  with pytest.raises(ValueError, match=r"config.ppo.dual_clip=0.5"):
    ppo.PPOConfig(dual_clip=0.5)
  with pytest.raises(ValueError, match=r"config.ppo.ent_coef=-0.1"):
    ppo.PPOConfig(ent_coef=-0.1)
  with pytest.raises(ValueError, match=r"kl_target"):
    ppo.PPOConfig(kl_target=-1.0)


def test_adaptive_kl_direction():
  ctl = ppo.PPOConfig(kl_coef=0.1, kl_target=1.0, kl_horizon=100.0).controller()
  assert isinstance(ctl, KLController) and ctl.adaptive
  assert float(ctl.update(0.1, 2.0, 10)) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
  assert float(ctl.update(0.1, 0.5, 10)) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
