"""KL estimators (Schulman 2020) and KL-coefficient controllers (Ziegler et al. 2019) by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses import kl


def test_estimators_on_known_values():
  # log π = log 0.5, log π_ref = log 0.25 -> Δ = -log 2; and Δ = +1.
  logps = jnp.asarray([[math.log(0.5), 0.0]])
  ref = jnp.asarray([[math.log(0.25), 1.0]])
  d = -math.log(2.0)
  np.testing.assert_allclose(kl.k1(logps, ref), [[-d, -1.0]], rtol=1e-6)
  np.testing.assert_allclose(kl.k2(logps, ref), [[0.5 * d * d, 0.5]], rtol=1e-6)
  np.testing.assert_allclose(kl.k3(logps, ref), [[0.5 - d - 1.0, math.e - 2.0]], rtol=1e-6)
  np.testing.assert_allclose(kl.kl_estimate(logps, ref, "k2"), kl.k2(logps, ref))
  np.testing.assert_array_equal(kl.k3(logps, logps), 0.0)


def test_log_ratio_is_clamped_and_k3_is_finite_and_nonnegative():
  logps = jnp.asarray([[0.0, -100.0, 0.0]])
  ref = jnp.asarray([[-100.0, 0.0, -1e-3]])
  np.testing.assert_allclose(kl.k1(logps, ref), [[20.0, -20.0, 1e-3]], rtol=1e-5)
  np.testing.assert_allclose(kl.k3(logps, ref)[0, :2], [math.exp(-20) + 19.0, math.exp(20) - 21.0],
                             rtol=1e-6)
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(0, 3, (64, 32)), jnp.float32) for _ in range(2))
  values = kl.k3(a, b)
  assert bool(jnp.all(values >= 0)) and bool(jnp.all(jnp.isfinite(values)))
  assert bool(jnp.all(kl.k2(a, b) >= 0))


def test_k3_gradient():
  # d k3 / d log π = 1 - exp(Δ); d k3 / d log π_ref = exp(Δ) - 1.
  g, g_ref = jax.grad(lambda a, b: jnp.sum(kl.k3(a, b)), argnums=(0, 1))(
      jnp.asarray([0.0]), jnp.asarray([1.0]))
  assert float(g[0]) == pytest.approx(1.0 - math.e, rel=1e-6)
  assert float(g_ref[0]) == pytest.approx(math.e - 1.0, rel=1e-6)


def test_unknown_estimator():
  with pytest.raises(ValueError, match="k4"):
    kl.kl_estimate(jnp.zeros((1, 1)), jnp.zeros((1, 1)), "k4")


def test_adaptive_controller_by_hand_and_under_jit():
  ctl = kl.KLController(init_coef=0.1, target=6.0, horizon=10000)
  beta = ctl.initial()
  assert beta.dtype == jnp.float32 and float(beta) == pytest.approx(0.1)
  update = jax.jit(ctl.update)  # beta, kl, n all traced
  # KL far above target: the error is clipped at +0.2.
  assert float(update(beta, 12.0, 256)) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000), rel=1e-6)
  # KL 10% below target: e = -0.1.
  assert float(update(beta, 5.4, 256)) == pytest.approx(0.1 * (1 - 0.1 * 256 / 10000), rel=1e-6)
  # Far below: clipped at -0.2.
  assert float(update(beta, 0.0, 100)) == pytest.approx(0.1 * (1 - 0.2 * 100 / 10000), rel=1e-6)


def test_fixed_controller_and_validation():
  ctl = kl.KLController(init_coef=0.05)
  assert not ctl.adaptive
  assert float(ctl.update(ctl.initial(), 100.0, 256)) == pytest.approx(0.05)
  with pytest.raises(ValueError, match="target"):
    kl.KLController(init_coef=0.1, target=0.0)
  with pytest.raises(ValueError, match="coefficient"):
    kl.KLController(init_coef=-1.0)
