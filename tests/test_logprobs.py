"""Chunked token log-probs against the full log-softmax gather, and against the model's logits."""

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
  logits = model.apply({"params": params}, ids, attention_mask=mask)
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1)[..., 0]
  stats = logprobs.model_token_stats(model, params, batch, chunk_size=3)
  np.testing.assert_allclose(stats["logprobs"][:, 1:], lp, atol=1e-5)
