"""Bradley–Terry reward loss against hand-computed values and TRL's metric conventions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses.reward import bradley_terry_loss


def softplus(x):
  return math.log1p(math.exp(x))


def test_loss_margin_center_and_metrics():
  rc, rr = jnp.asarray([1.0, 0.0]), jnp.asarray([0.0, 2.0])
  loss, m = bradley_terry_loss(rc, rr)
  assert float(loss) == pytest.approx((softplus(-1.0) + softplus(2.0)) / 2, rel=1e-6)
  loss, m = bradley_terry_loss(rc, rr, margin=jnp.asarray([0.5, 0.0]),
                               center_rewards_coefficient=0.01)
  want = (softplus(-0.5) + softplus(2.0)) / 2 + 0.01 * (1.0 + 4.0) / 2
  assert float(loss) == pytest.approx(want, rel=1e-6)
  assert {k: float(v) for k, v in m.items()} == pytest.approx(
      {"accuracy": 0.5, "margin": -0.5, "mean_reward": 0.75, "min_reward": 0.0, "max_reward": 2.0})


def test_equal_rewards_give_log2_and_zero_accuracy():
  r = jnp.asarray([0.3, -1.2, 4.0])
  loss, m = bradley_terry_loss(r, r)
  assert float(loss) == pytest.approx(math.log(2), rel=1e-6)
  assert float(m["accuracy"]) == 0.0


def test_gradients_finite_and_signed_at_extremes():
  rc, rr = jnp.asarray([1e4, -1e4, 0.0]), jnp.asarray([-1e4, 1e4, 0.0])
  f = lambda a, b: bradley_terry_loss(a, b, center_rewards_coefficient=1e-3)[0]
  loss, (gc, gr) = jax.value_and_grad(f, argnums=(0, 1))(rc, rr)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(gc)) and np.all(np.isfinite(gr))
  assert float(gc[2]) < 0 < float(gr[2])  # raising the chosen score lowers the loss


def test_negative_center_coefficient_is_rejected():
  with pytest.raises(ValueError, match="config.center_rewards_coefficient"):
    bradley_terry_loss(jnp.zeros(2), jnp.zeros(2), center_rewards_coefficient=-0.1)
