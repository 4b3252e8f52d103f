"""DPO-family losses against values computed by hand (math on scalars), plus edge cases."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxpost.losses.dpo import LOSS_TYPES, PreferenceLossConfig, kto_loss, preference_loss


def logsig(x):
  return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def pair(loss_type, pc, pr, nc, nr, rc=None, rr=None, **kw):
  cfg = PreferenceLossConfig(loss_type=loss_type, **kw)
  arr = lambda x: None if x is None else jnp.asarray([x], jnp.float32)
  loss, m = preference_loss(cfg, arr(pc), arr(pr), arr(nc), arr(nr), arr(rc), arr(rr))
  return float(loss), {k: float(v) for k, v in m.items()}


# One pair: chosen log-ratio +1.5, rejected log-ratio -0.5 -> Δ = 2.
PAIR = dict(pc=-10.0, pr=-12.5, nc=4, nr=5, rc=-11.5, rr=-12.0)


def test_sigmoid_and_cdpo_label_smoothing():
  rho = 0.5 * 2.0
  loss, m = pair("sigmoid", beta=0.5, **PAIR)
  assert loss == pytest.approx(-logsig(rho), rel=1e-6)
  loss, _ = pair("sigmoid", beta=0.5, label_smoothing=0.1, **PAIR)
  assert loss == pytest.approx(-0.9 * logsig(rho) - 0.1 * logsig(-rho), rel=1e-6)
  assert m["rewards/chosen"] == pytest.approx(0.75)
  assert m["rewards/rejected"] == pytest.approx(-0.25)
  assert m["rewards/margins"] == pytest.approx(1.0) and m["rewards/accuracies"] == 1.0
  assert m["logps/chosen"] == -10.0 and m["logps/rejected"] == -12.5


def test_hinge_and_robust():
  assert pair("hinge", beta=0.2, **PAIR)[0] == pytest.approx(1 - 0.4, rel=1e-6)
  assert pair("hinge", beta=1.0, **PAIR)[0] == 0.0
  eps, rho = 0.2, 0.4
  want = (-(1 - eps) * logsig(rho) + eps * logsig(-rho)) / (1 - 2 * eps)
  assert pair("robust", beta=0.2, label_smoothing=eps, **PAIR)[0] == pytest.approx(want, rel=1e-6)


def test_ipo_uses_length_averaged_log_ratios():
  # chosen ratio 1.5 over 4 tokens, rejected -0.5 over 5: h = 0.375 + 0.1 = 0.475.
  loss, m = pair("ipo", beta=0.5, **PAIR)
  assert loss == pytest.approx((0.475 - 1.0) ** 2, rel=1e-6)
  assert loss != pytest.approx((2.0 - 1.0) ** 2)  # what summed log-ratios would give
  assert m["rewards/chosen"] == pytest.approx(0.75)  # rewards stay on summed log-ratios (as TRL)


def test_simpo_gamma_and_length_normalisation():
  # avg π_c = -4/2 = -2, avg π_r = -9/3 = -3, β = 2, γ = 0.5 -> s = 2·1 - 0.5 = 1.5
  loss, m = pair("simpo", -4.0, -9.0, 2, 3, beta=2.0, simpo_gamma=0.5)
  assert loss == pytest.approx(-logsig(1.5), rel=1e-6)
  assert m["rewards/chosen"] == pytest.approx(-4.0) and m["rewards/rejected"] == pytest.approx(-6.0)
  loss_smooth, _ = pair("simpo", -4.0, -9.0, 2, 3, beta=2.0, simpo_gamma=0.5, label_smoothing=0.2)
  assert loss_smooth == pytest.approx(-0.8 * logsig(1.5) - 0.2 * logsig(-1.5), rel=1e-6)


def test_orpo_log_odds():
  # avg p_c = 0.5 (odds 1), avg p_r = 0.2 (odds 1/4): log odds ratio = log 4, σ(log 4) = 0.8.
  pc, pr = 2 * math.log(0.5), 3 * math.log(0.2)
  loss, m = pair("orpo", pc, pr, 2, 3, beta=0.1)
  nll = math.log(2.0)  # -pc / 2 tokens
  assert m["log_odds_chosen"] == pytest.approx(math.log(4.0), rel=1e-5)
  assert m["log_odds_ratio"] == pytest.approx(math.log(0.8), rel=1e-5)
  assert m["nll_loss"] == pytest.approx(nll, rel=1e-6)
  assert loss == pytest.approx(nll - 0.1 * math.log(0.8), rel=1e-5)
  assert m["rewards/chosen"] == pytest.approx(0.1 * math.log(0.5), rel=1e-6)


def test_rpo_adds_per_token_chosen_nll():
  cfg0, cfg1 = PreferenceLossConfig(), PreferenceLossConfig(sft_weight=0.7)
  args = [jnp.asarray(x, jnp.float32) for x in
          ([-10., -20.], [-12., -15.], [4, 6], [3, 3], [-11., -18.], [-11., -16.])]
  l0, _ = preference_loss(cfg0, *args)
  l1, m1 = preference_loss(cfg1, *args)
  assert float(m1["nll_loss"]) == pytest.approx(30.0 / 10.0)
  assert float(l1) == pytest.approx(float(l0) + 0.7 * 3.0, rel=1e-6)


@pytest.mark.parametrize("loss_type,want", [
    ("sigmoid", math.log(2)), ("robust", math.log(2)), ("hinge", 1.0), ("ipo", (1 / 0.2) ** 2)])
def test_policy_equal_to_reference(loss_type, want):
  pc, pr = jnp.asarray([-3., -40., -7.]), jnp.asarray([-5., -2., -7.])
  n = jnp.asarray([3., 9., 4.])
  eps = 0.1 if loss_type == "robust" else 0.0
  cfg = PreferenceLossConfig(loss_type=loss_type, beta=0.1, label_smoothing=eps)
  loss, m = preference_loss(cfg, pc, pr, n, n, pc, pr)
  assert float(loss) == pytest.approx(want, rel=1e-6)
  assert float(m["rewards/accuracies"]) == 0.0 and float(m["rewards/margins"]) == 0.0


def test_accuracy_counts_float_rounding_as_ties():
  # A differentiated policy forward rounds differently from the reference forward (~1e-7 relative).
  cfg = PreferenceLossConfig(beta=0.1)
  ref_c, ref_r = jnp.asarray([-146.5, -110.6, -14.8]), jnp.asarray([-112.1, -90.0, -30.0])
  noise = jnp.asarray([3e-5, -2e-5, 1e-5])
  _, m = preference_loss(cfg, ref_c + noise, ref_r - noise, ref_c * 0 + 9, ref_r * 0 + 9, ref_c,
                         ref_r)
  assert float(m["rewards/accuracies"]) == 0.0
  _, m = preference_loss(cfg, ref_c + 0.05, ref_r, ref_c * 0 + 9, ref_r * 0 + 9, ref_c, ref_r)
  assert float(m["rewards/accuracies"]) == 1.0


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "kto"])
def test_gradients_finite_at_extreme_log_ratios(loss_type):
  cfg = PreferenceLossConfig(loss_type=loss_type, beta=0.1)
  big = jnp.asarray([1e4, -1e4, 0.0, 3e4], jnp.float32)
  pc, pr = jnp.asarray([-1e-9, -1e4, -5.0, -2e4]), jnp.asarray([-1e4, -1e-9, -5.0, -1.0])
  rc, rr = pc - big, pr + big
  n = jnp.asarray([1., 7., 3., 1.])
  f = lambda pc, pr: preference_loss(cfg, pc, pr, n, n, rc, rr)[0]
  loss, grads = jax.value_and_grad(f, argnums=(0, 1))(pc, pr)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_kto_kl_term_and_weights():
  cfg = PreferenceLossConfig(loss_type="kto", beta=0.5, desirable_weight=1.0,
                             undesirable_weight=2.0)
  pi, ref = jnp.asarray([-5., -7.]), jnp.asarray([-6., -6.])
  labels, n = jnp.asarray([1, 0]), jnp.asarray([2., 3.])
  kl_pi, kl_ref = jnp.asarray([-10., -12.]), jnp.asarray([-11., -12.5])  # z = mean(1, 0.5)
  loss, m = kto_loss(cfg, pi, n, labels, ref, kl_pi, kl_ref)
  sig = lambda x: 1 / (1 + math.exp(-x))
  want = (1 - sig(0.5 * (1 - 0.75)) + 2 * (1 - sig(0.5 * (0.75 + 1)))) / 2
  assert float(loss) == pytest.approx(want, rel=1e-6)
  assert float(m["kl"]) == pytest.approx(0.75)
  assert float(m["rewards/chosen"]) == 0.5 and float(m["rewards/rejected"]) == -0.5
  assert float(m["rewards/margins"]) == 1.0 and float(m["logps/rejected"]) == -7.0
  # The KL estimate is clamped at 0 and carries no gradient.
  _, m0 = kto_loss(cfg, pi, n, labels, ref, kl_ref, kl_pi)
  assert float(m0["kl"]) == 0.0
  g = jax.grad(lambda k: kto_loss(cfg, pi, n, labels, ref, k, kl_ref)[0])(kl_pi)
  assert np.all(np.asarray(g) == 0.0)
  g = jax.grad(lambda p: kto_loss(cfg, p, n, labels, ref, kl_pi, kl_ref)[0])(pi * 0 + 1e4)
  assert np.all(np.isfinite(g))


def test_logits_metrics_are_token_weighted():
  # Row sums of the vocabulary-mean logit over completion tokens (chosen 2 + 4, rejected 1 + 1).
  cfg = PreferenceLossConfig()
  x = jnp.asarray([-1., -2.])
  _, m = preference_loss(cfg, x, x, jnp.asarray([2., 4.]), jnp.asarray([1., 1.]), x, x,
                         jnp.asarray([1.0, -7.0]), jnp.asarray([3., 5.]))
  assert float(m["logits/chosen"]) == pytest.approx(-1.0)  # (1 - 7) / 6, not mean(1/2, -7/4)
  assert float(m["logits/rejected"]) == pytest.approx(4.0)
  assert "logits/chosen" not in preference_loss(cfg, x, x, x * 0 + 1, x * 0 + 1, x, x)[1]


def test_jit_and_from_config():
  config = ml_collections.ConfigDict({"loss_type": "ipo", "beta": 0.3, "max_steps": 3})
  cfg = PreferenceLossConfig.from_config(config)
  assert (cfg.loss_type, cfg.beta, cfg.label_smoothing) == ("ipo", 0.3, 0.0)
  f = jax.jit(functools.partial(preference_loss, cfg))
  x = jnp.asarray([-1., -2.])
  assert np.isfinite(float(f(x, x - 1, x * 0 + 2, x * 0 + 2, x, x)[0]))


@pytest.mark.parametrize("kw,match", [
    (dict(beta=0.0), "config.beta"), (dict(beta=-1.0), "config.beta"),
    (dict(label_smoothing=0.5), "config.label_smoothing"),
    (dict(label_smoothing=-0.1), "config.label_smoothing"),
    (dict(loss_type="hinge", label_smoothing=0.1), "config.label_smoothing"),
    (dict(loss_type="dpo"), "config.loss_type"), (dict(sft_weight=-1.0), "config.sft_weight"),
    (dict(loss_type="kto", undesirable_weight=0.0), "config.undesirable_weight")])
def test_bad_config(kw, match):
  with pytest.raises(ValueError, match=match):
    PreferenceLossConfig(**kw)


def test_reference_based_loss_without_reference():
  x = jnp.asarray([-1.0])
  for loss_type in ("sigmoid", "ipo"):
    with pytest.raises(ValueError, match="config.ref"):
      preference_loss(PreferenceLossConfig(loss_type=loss_type), x, x, x, x)
  with pytest.raises(ValueError, match="config.ref"):
    kto_loss(PreferenceLossConfig(loss_type="kto"), x, x, x)
  with pytest.raises(ValueError, match="kto_loss"):
    preference_loss(PreferenceLossConfig(loss_type="kto"), x, x, x, x, x, x)
  assert np.isfinite(float(preference_loss(PreferenceLossConfig(loss_type="simpo"), x, x, x, x)[0]))
