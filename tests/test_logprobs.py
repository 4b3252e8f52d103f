"""Chunked token log-probs against the full log-softmax gather, and against the model's logits;
targets-only log-probs (a mask) against the all-positions ones."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses import logprobs
from jaxpost.models.config import LlamaConfig
from jaxpost.models.llama import LlamaForCausalLM, init_params

B, T, D, V = 2, 13, 16, 50


def _inputs(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  hidden = jax.random.normal(k1, (B, T, D))
  kernel = jax.random.normal(k2, (D, V)) * 0.5
  ids = jax.random.randint(k3, (B, T), 0, V)
  return hidden, kernel, ids


def _reference(hidden, kernel, ids):
  """log_softmax(h_{t-1} W)[x_t] over the whole [B, T, V] logits, 0 at t = 0."""
  logp = jax.nn.log_softmax(hidden[:, :-1] @ kernel, axis=-1)
  gathered = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(gathered, ((0, 0), (1, 0)))


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_equals_full_values_and_grads(chunk):
  hidden, kernel, ids = _inputs()
  weights = jax.random.normal(jax.random.PRNGKey(9), (B, T))
  chunked = lambda h, w: jnp.sum(weights * logprobs.token_logprobs(h, w, ids, chunk))
  full = lambda h, w: jnp.sum(weights * _reference(h, w, ids))
  chex.assert_trees_all_close(logprobs.token_logprobs(hidden, kernel, ids, chunk),
                              _reference(hidden, kernel, ids), atol=1e-5)
  chex.assert_trees_all_close(jax.grad(chunked, (0, 1))(hidden, kernel),
                              jax.grad(full, (0, 1))(hidden, kernel), atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_temperature_scales_logits_values_and_grads(masked):
  """At temperature T the log-probs (and their gradient) are those of log_softmax(h W / T)."""
  hidden, kernel, ids = _inputs(2)
  mask = (jax.random.uniform(jax.random.PRNGKey(4), (B, T)) < 0.5) if masked else None
  keep = jnp.ones((B, T)) if mask is None else mask.astype(jnp.float32)
  ours = lambda h, w: logprobs.token_logprobs(h, w, ids, 4, mask, temperature=0.6)
  full = lambda h, w: _reference(h, w / 0.6, ids) * keep
  chex.assert_trees_all_close(ours(hidden, kernel), full(hidden, kernel), atol=1e-5)
  assert float(jnp.abs(ours(hidden, kernel) - _reference(hidden, kernel, ids) * keep).max()) > 0.1
  total = lambda f: lambda h, w: jnp.sum(f(h, w))
  chex.assert_trees_all_close(jax.grad(total(ours), (0, 1))(hidden, kernel),
                              jax.grad(total(full), (0, 1))(hidden, kernel), atol=1e-5)


def test_stats_match_direct_computation():
  hidden, kernel, ids = _inputs(1)
  stats = logprobs.token_stats(hidden, kernel, ids, chunk_size=4)
  logits = hidden[:, :-1] @ kernel
  p = jax.nn.softmax(logits, -1)
  entropy = -(p * jnp.log(p)).sum(-1)
  correct = (logits.argmax(-1) == ids[:, 1:]).astype(jnp.float32)
  np.testing.assert_allclose(stats["entropy"][:, 1:], entropy, atol=1e-5)
  np.testing.assert_array_equal(stats["correct"][:, 1:], correct)
  np.testing.assert_allclose(stats["logit_mean"][:, 1:], logits.mean(-1), atol=1e-5)
  assert float(jnp.abs(stats["entropy"][:, 0]).max()) == 0.0


def _dense_entropy(hidden, kernel, temperature=1.0):
  """H(softmax(h_{t-1} W / temperature)) over the whole [B, T, V] logits, 0 at t = 0."""
  logp = jax.nn.log_softmax(hidden[:, :-1] @ kernel / temperature, axis=-1)
  return jnp.pad(-jnp.sum(jnp.exp(logp) * logp, axis=-1), ((0, 0), (1, 0)))


@pytest.mark.parametrize("chunk,masked,temperature", [(4, False, 1.0), (3, True, 0.7),
                                                      (64, True, 1.0)])
def test_entropy_gradient_equals_dense_autodiff(chunk, masked, temperature):
  """With entropy_grad the chunked entropy (alone and next to the log-probs, as PPO's
  L_pg − c H) has the value and the gradient of autodiff through the dense entropy; without it,
  none."""
  hidden, kernel, ids = _inputs(5)
  mask = (jax.random.uniform(jax.random.PRNGKey(6), (B, T)) < 0.6) if masked else None
  keep = jnp.ones((B, T)) if mask is None else mask.astype(jnp.float32)
  weights = jax.random.normal(jax.random.PRNGKey(7), (B, T))

  def ours(h, w, entropy_grad=True):
    stats = logprobs.token_stats(h, w, ids, chunk, mask, temperature=temperature,
                                 entropy_grad=entropy_grad)
    return stats["entropy"], stats["logprobs"]

  def dense(h, w):
    return (_dense_entropy(h, w, temperature) * keep,
            _reference(h, w / temperature, ids) * keep)

  chex.assert_trees_all_close(ours(hidden, kernel), dense(hidden, kernel), atol=1e-5)
  for objective in (lambda e, lp: jnp.sum(weights * e),
                    lambda e, lp: jnp.sum(weights * lp) - 0.3 * jnp.sum(e)):
    grads = jax.grad(lambda h, w: objective(*ours(h, w)), (0, 1))(hidden, kernel)
    chex.assert_trees_all_close(grads, jax.grad(lambda h, w: objective(*dense(h, w)), (0, 1))(
        hidden, kernel), atol=1e-5)
  no_grad = jax.grad(lambda h: jnp.sum(weights * ours(h, kernel, entropy_grad=False)[0]))(hidden)
  assert float(jnp.abs(no_grad).max()) == 0.0
  assert float(jnp.abs(grads[0]).max()) > 1e-3


def _mask(kind):
  """[B, T] masks: none / every / a ragged trailing span per row / scattered positions."""
  if kind == "zeros":
    return jnp.zeros((B, T), jnp.int32)
  if kind == "ones":
    return jnp.ones((B, T), jnp.int32)
  if kind == "ragged":  # completions of different lengths at the end of each row
    return (jnp.arange(T)[None, :] >= jnp.array([[4], [11]])).astype(jnp.int32)
  return jax.random.bernoulli(jax.random.PRNGKey(3), 0.3, (B, T)).astype(jnp.int32)


@pytest.mark.parametrize("kind,chunk,groups", [("zeros", 4, 1), ("ones", 1, 2), ("ones", 64, 1),
                                               ("ragged", 4, 1), ("ragged", 4, 2),
                                               ("ragged", 64, 2), ("scattered", 3, 1)])
def test_targets_only_equals_all_positions_values_and_grads(kind, chunk, groups):
  hidden, kernel, ids = _inputs(2)
  mask = _mask(kind)
  keep = mask.astype(jnp.float32).at[:, 0].set(0.0)
  weights = jax.random.normal(jax.random.PRNGKey(4), (B, T))
  full = logprobs.token_stats(hidden, kernel, ids, chunk)
  masked = jax.jit(logprobs.token_stats, static_argnums=(3, 5))(hidden, kernel, ids, chunk, mask,
                                                                 groups)
  chex.assert_trees_all_close(masked, {k: v * keep for k, v in full.items()}, atol=1e-5)
  loss_full = lambda h, w: jnp.sum(weights * keep * logprobs.token_logprobs(h, w, ids, chunk))
  loss_masked = lambda h, w: jnp.sum(
      weights * logprobs.token_stats(h, w, ids, chunk, mask, groups)["logprobs"])
  grads = jax.jit(jax.grad(loss_masked, (0, 1)))(hidden, kernel)
  chex.assert_trees_all_close(grads, jax.grad(loss_full, (0, 1))(hidden, kernel), atol=1e-5)
  if kind == "zeros":
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


@pytest.mark.parametrize("groups", [1, 2])
def test_chunks_without_targets_are_skipped_forward_and_backward(groups):
  """Hidden rows that predict non-targets are NaN; each row has 4 targets, which fill exactly
  the first (sorted) chunk of 4 positions per row, so every NaN row lands in a chunk without
  targets. Finite values and kernel gradient mean those chunks never ran the LM head (computing
  them and masking the result would give NaN * 0 = NaN)."""
  hidden, kernel, ids = _inputs(5)
  mask = jnp.zeros((B, T), jnp.int32).at[0, 2:6].set(1).at[1, 9:13].set(1)
  predicts_target = jnp.pad(mask[:, 1:], ((0, 0), (0, 1))) > 0  # hidden t-1 predicts token t
  hidden = jnp.where(predicts_target[..., None], hidden, jnp.nan)
  loss = lambda h, w: jnp.sum(logprobs.token_stats(h, w, ids, 4, mask, groups)["logprobs"])
  value, (g_hidden, g_kernel) = jax.jit(jax.value_and_grad(loss, (0, 1)))(hidden, kernel)
  assert np.isfinite(float(value)) and bool(jnp.isfinite(g_kernel).all())
  clean = jnp.where(predicts_target[..., None], hidden, 0.0)
  np.testing.assert_allclose(value, jnp.sum(_reference(clean, kernel, ids) * mask), rtol=1e-5)
  assert float(jnp.abs(jnp.where(predicts_target[..., None], 0.0, g_hidden)).max()) == 0.0


def test_targets_only_inside_scan_equals_sum_over_microbatches():
  """Gradient accumulation style: grad of a lax.scan over microbatches = sum of their grads."""
  hidden, kernel, ids = _inputs(6)
  masks = jnp.stack([_mask("ragged"), _mask("scattered")])
  one = lambda h, w, m: jnp.sum(logprobs.token_logprobs(h, w, ids, 4, m))
  scanned = lambda h, w: jax.lax.scan(lambda c, m: (c + one(h, w, m), None), 0.0, masks)[0]
  separate = [jax.grad(one, (0, 1))(hidden, kernel, m) for m in masks]
  chex.assert_trees_all_close(jax.jit(jax.grad(scanned, (0, 1)))(hidden, kernel),
                              jax.tree.map(jnp.add, *separate), atol=1e-5)


def test_bad_mask_or_groups_are_rejected():
  hidden, kernel, ids = _inputs()
  with pytest.raises(ValueError, match="mask shape"):
    logprobs.token_stats(hidden, kernel, ids, 4, ids[:, 1:])
  with pytest.raises(ValueError, match="groups=3"):
    logprobs.token_stats(hidden, kernel, ids, 4, None, 3)


def test_sequence_logprobs_sum_and_average():
  lp = jnp.array([[0.0, -1.0, -2.0, -3.0], [0.0, -4.0, 0.0, 0.0]])
  mask = jnp.array([[0, 1, 1, 0], [0, 0, 0, 0]])
  np.testing.assert_allclose(logprobs.sequence_logprobs(lp, mask), [-3.0, 0.0])
  np.testing.assert_allclose(logprobs.sequence_logprobs(lp, mask, average=True), [-1.5, 0.0])


@pytest.mark.parametrize("tied", [False, True])
def test_model_token_stats_match_model_logits(tied):
  cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    tie_word_embeddings=tied)
  model = LlamaForCausalLM(cfg)
  params = init_params(model, jax.random.PRNGKey(0))
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, 64)
  mask = jnp.ones_like(ids).at[1, 7:].set(0)
  batch = {"input_ids": ids, "attention_mask": mask}
  logits = jax.jit(model.apply)({"params": params}, ids, attention_mask=mask)
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1)[..., 0]
  stats = jax.jit(lambda b, only: logprobs.model_token_stats(model, params, b, chunk_size=3,
                                                              targets_only=only)["logprobs"],
                  static_argnums=1)
  np.testing.assert_allclose(stats(batch, True)[:, 1:], lp, atol=1e-5)  # no loss_mask: all
  loss_mask = jnp.zeros_like(ids).at[0, 4:].set(1).at[1, 5:7].set(1)
  batch["loss_mask"] = loss_mask
  np.testing.assert_allclose(stats(batch, True)[:, 1:], lp * loss_mask[:, 1:], atol=1e-5)
  np.testing.assert_allclose(stats(batch, False)[:, 1:], lp, atol=1e-5)
