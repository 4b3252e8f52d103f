"""Distillation losses: hand-computed values, the β endpoints, the τ² factor, top-k truncation,
the hard-label mix, and the chunked training version against the dense one on two tiny models."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses import distill
from jaxpost.models.config import LlamaConfig
from jaxpost.models.llama import LlamaForCausalLM, init_params, output_kernel

# p_S = [1/3, 2/3], p_T = [1/2, 1/2]
STUDENT = jnp.array([[[0.0, math.log(2.0)]]])
TEACHER = jnp.array([[[0.0, 0.0]]])
FORWARD = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
REVERSE = (1 / 3) * math.log((1 / 3) / 0.5) + (2 / 3) * math.log((2 / 3) / 0.5)


def test_hand_computed_values():
  m = [0.5 * 0.5 + 0.5 / 3, 0.5 * 0.5 + 0.5 * 2 / 3]  # M = β p_T + (1 − β) p_S at β = 1/2
  jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
      (1 / 3) * math.log((1 / 3) / m[0]) + (2 / 3) * math.log((2 / 3) / m[1]))
  np.testing.assert_allclose(distill.forward_kl(STUDENT, TEACHER), [[FORWARD]], rtol=1e-6)
  np.testing.assert_allclose(distill.reverse_kl(STUDENT, TEACHER), [[REVERSE]], rtol=1e-6)
  np.testing.assert_allclose(distill.generalized_jsd(STUDENT, TEACHER, 0.5), [[jsd]], rtol=1e-6)
  assert distill.generalized_jsd(STUDENT, TEACHER, 0.5).shape == (1, 1)


def test_beta_endpoints_are_the_kls_and_the_limits_agree():
  ks, kt = jax.random.split(jax.random.PRNGKey(0))
  s, t = jax.random.normal(ks, (2, 5, 11)) * 2, jax.random.normal(kt, (2, 5, 11)) * 2
  fwd = distill.forward_kl(s, t, 1.5, temperature_scale=False)
  rev = distill.reverse_kl(s, t, 1.5)
  chex.assert_trees_all_equal(distill.generalized_jsd(s, t, 0.0, 1.5), fwd)
  chex.assert_trees_all_equal(distill.generalized_jsd(s, t, 1.0, 1.5), rev)
  assert float(jnp.abs(fwd - rev).max()) > 0.1
  eps = 1e-3  # JSD_β / β → forward KL, JSD_β / (1 − β) → reverse KL
  np.testing.assert_allclose(distill.generalized_jsd(s, t, eps, 1.5) / eps, fwd, rtol=2e-2)
  np.testing.assert_allclose(distill.generalized_jsd(s, t, 1 - eps, 1.5) / eps, rev, rtol=2e-2)


def test_temperature_and_its_square_factor():
  # At τ = 2 the logits 2 z give the same distributions as z at τ = 1.
  scaled = distill.forward_kl(2 * STUDENT, 2 * TEACHER, temperature=2.0)
  np.testing.assert_allclose(scaled, [[4 * FORWARD]], rtol=1e-6)
  plain = distill.forward_kl(2 * STUDENT, 2 * TEACHER, temperature=2.0, temperature_scale=False)
  np.testing.assert_allclose(plain, [[FORWARD]], rtol=1e-6)
  cfg = distill.DistillConfig(temperature=2.0)
  np.testing.assert_allclose(
      distill.token_losses(cfg, 2 * STUDENT, 2 * TEACHER, jnp.array([[0]]))["divergence"],
      [[4 * FORWARD]], rtol=1e-6)


def test_top_k_teacher_and_hard_weight():
  student = jnp.array([[0.0, 0.0, 0.0]])           # p_S uniform
  teacher = jnp.array([[math.log(3.0), 0.0, -1.0]])  # top 2: [3/4, 1/4, 0]
  cfg = distill.DistillConfig(top_k=2, hard_weight=0.25)
  out = distill.token_losses(cfg, student, teacher, jnp.array([1]))
  kl = 0.75 * math.log(0.75 * 3) + 0.25 * math.log(0.25 * 3)
  np.testing.assert_allclose(out["divergence"], [kl], rtol=1e-6)
  np.testing.assert_allclose(out["nll"], [math.log(3.0)], rtol=1e-6)
  np.testing.assert_allclose(out["loss"], [0.75 * kl + 0.25 * math.log(3.0)], rtol=1e-6)
  jsd = distill.token_losses(distill.DistillConfig(beta=0.5, top_k=2), student, teacher,
                             jnp.array([1]))
  assert np.isfinite(float(jsd["divergence"][0]))
  grad = jax.grad(lambda s: distill.token_losses(cfg, s, teacher, jnp.array([1]))["loss"].sum())
  assert np.isfinite(np.asarray(grad(student))).all()


@pytest.mark.parametrize("values, key", [
    ({"beta": 1.5}, "beta"), ({"temperature": 0.0}, "temperature"),
    ({"hard_weight": -0.1}, "hard_weight"), ({"top_k": -1}, "top_k"),
    ({"beta": 1.0, "top_k": 4}, "top_k")])
def test_bad_settings_name_their_key(values, key):
  with pytest.raises(ValueError, match=f"config.distill.{key}"):
    distill.DistillConfig(**values)


def _tiny(hidden, layers, seed, vocab=48):
  cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=hidden // 4)
  model = LlamaForCausalLM(cfg)
  return model, init_params(model, jax.random.PRNGKey(seed))


@pytest.mark.parametrize("cfg, chunk", [
    (distill.DistillConfig(beta=0.5, temperature=2.0, hard_weight=0.3), 3),
    (distill.DistillConfig(beta=0.0, top_k=5), 16),
    (distill.DistillConfig(beta=1.0), 4)])
def test_chunked_equals_dense_values_and_grads(cfg, chunk):
  student, s_params = _tiny(16, 2, 0)
  teacher, t_params = _tiny(32, 3, 1)
  t_params["lm_head"]["kernel"] *= 40.0  # a peaked teacher: divergences of order 1
  b, t = 2, 9
  ids = jax.random.randint(jax.random.PRNGKey(2), (b, t), 0, 48)
  mask = (jax.random.uniform(jax.random.PRNGKey(3), (b, t)) < 0.6).at[:, 0].set(False)
  t_hidden = teacher.apply({"params": t_params}, ids, method="hidden_states")
  t_logits = teacher.apply({"params": t_params}, ids)

  def dense(params):
    logits = student.apply({"params": params}, ids)
    losses = distill.token_losses(cfg, logits[:, :-1], t_logits[:, :-1], ids[:, 1:])
    padded = {k: jnp.pad(v, ((0, 0), (1, 0))) for k, v in losses.items()}
    return distill.masked_token_mean(padded, mask)

  def chunked(params):
    hidden = student.apply({"params": params}, ids, method="hidden_states")
    losses = distill.chunked_token_losses(cfg, hidden, output_kernel(params, student.cfg),
                                          t_hidden, output_kernel(t_params, teacher.cfg), ids,
                                          mask, chunk_size=chunk)
    return distill.masked_token_mean(losses, mask)

  (want, want_m), want_g = jax.value_and_grad(dense, has_aux=True)(s_params)
  (got, got_m), got_g = jax.value_and_grad(chunked, has_aux=True)(s_params)
  assert float(want) > 0.1
  chex.assert_trees_all_close(got, want, atol=1e-5)
  chex.assert_trees_all_close(got_m, want_m, atol=1e-5)
  chex.assert_trees_all_close(got_g, want_g, atol=1e-5)


def test_vocabulary_mismatch_is_refused():
  with pytest.raises(ValueError, match="vocabulary 48 != teacher vocabulary 64"):
    distill.chunked_token_losses(distill.DistillConfig(), jnp.zeros((1, 3, 4)),
                                 jnp.zeros((4, 48)), jnp.zeros((1, 3, 4)), jnp.zeros((4, 64)),
                                 jnp.zeros((1, 3), jnp.int32))
