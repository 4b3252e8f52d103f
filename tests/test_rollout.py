"""Rollouts (algos/rollout.py): recomputed log-probs == a full training forward, shared prefill ==
separate prefills, completion masks through the EOS, determinism, and 8 devices == 1."""

import jax
import numpy as np
import pytest

from jaxpost.algos.rollout import RolloutConfig, sample_rollout
from jaxpost.data.batching import prompt_batch
from jaxpost.generate import generate, sample_tokens
from jaxpost.generation_io import encode_prompts
from jaxpost.hf import LoadedModel, load_tokenizer
from jaxpost.models.llama import LlamaForCausalLM, init_params
from tests.conftest import run_on_fake_devices
from tests.test_generate import tiny_config

PROMPTS = ["What is 12 times 7?", "Name a prime number larger than ten, please."]
G, N = 4, 8


@pytest.fixture(scope="module")
def lm(bundled_dir):
  cfg = tiny_config()
  model = LlamaForCausalLM(cfg)
  params = jax.tree.map(lambda p: 3 * p, init_params(model, jax.random.PRNGKey(0)))  # peakier
  return LoadedModel(model, params, load_tokenizer(bundled_dir), cfg)


@pytest.fixture(scope="module")
def batch(lm):
  """The prompts encoded as generate() does and batched as the loader does (left-padded)."""
  ids = encode_prompts(lm.tokenizer, PROMPTS, None, lm.config, N)
  records = [{"prompt_ids": np.asarray(x, np.int32)} for x in ids]
  return prompt_batch(records, rows=[0, 1], buckets=(32, 64), pad_id=lm.config.pad_token_id)


def rollout(lm, batch, seed=0, **kw):
  config = RolloutConfig(**{"num_generations": G, "max_new_tokens": N, **kw})
  return jax.device_get(sample_rollout(lm.model, lm.params, batch, jax.random.PRNGKey(seed),
                                       config))


def full_forward_logprobs(lm, out, temperature):
  """log softmax(logits / T)[input_ids[t]] predicted from t - 1, one uncached model.apply."""
  logits = lm.model.apply({"params": lm.params}, out.input_ids, out.attention_mask, out.positions)
  logp = jax.nn.log_softmax(np.asarray(logits) / temperature, axis=-1)[:, :-1]
  gathered = np.take_along_axis(np.asarray(logp), out.input_ids[:, 1:, None], axis=-1)[..., 0]
  return np.pad(gathered, ((0, 0), (1, 0))) * out.completion_mask


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_logprobs_equal_full_forward_and_sampler(lm, batch, temperature):
  out = rollout(lm, batch, temperature=temperature)
  assert out.input_ids.shape == (len(PROMPTS) * G, batch["prompt_input_ids"].shape[1] + N)
  assert out.completion_mask.sum() > 0
  np.testing.assert_allclose(out.logprobs, full_forward_logprobs(lm, out, temperature), atol=1e-5)
  # Without top-k / top-p, q = softmax(z / T): the sampler's log-probs are the same numbers.
  np.testing.assert_allclose(out.sampler_logprobs, out.logprobs, atol=1e-5)
  assert out.metrics["sampling/logp_difference/max"] < 1e-5
  diff = np.abs(out.logprobs - out.sampler_logprobs)[out.completion_mask > 0]
  np.testing.assert_allclose(out.metrics["sampling/logp_difference/mean"], diff.mean(), atol=1e-7)


def test_top_k_truncation_shows_in_logp_difference(lm, batch):
  """log q under top-k renormalises over k tokens, so it exceeds the full-vocabulary log-prob."""
  out = rollout(lm, batch, temperature=1.0, top_k=5)
  on = out.completion_mask > 0
  assert np.all(out.sampler_logprobs[on] >= out.logprobs[on] - 1e-6)
  assert out.metrics["sampling/logp_difference/mean"] > 1e-3


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefill_equals_separate_prefills(lm, batch, temperature):
  ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
  kw = dict(max_new_tokens=N, temperature=temperature)
  rng = jax.random.PRNGKey(3)
  shared = jax.device_get(sample_tokens(lm.model, lm.params, ids, mask, rng, num_samples=G, **kw))
  separate = jax.device_get(sample_tokens(lm.model, lm.params, np.repeat(ids, G, 0),
                                          np.repeat(mask, G, 0), rng, **kw))
  np.testing.assert_array_equal(shared["tokens"], separate["tokens"])
  np.testing.assert_array_equal(shared["lengths"], separate["lengths"])
  np.testing.assert_allclose(shared["logprobs"], separate["logprobs"], atol=1e-5)
  if temperature:  # the G samples of a prompt differ (their own row streams)
    assert len({tuple(t) for t in shared["tokens"][:G]}) > 1


def test_rollout_tokens_equal_generate_n(lm, batch):
  """generate(n=G, seed) numbers its rows the same way: the same completions."""
  out = rollout(lm, batch, seed=5, temperature=1.0)
  ref = generate(lm, PROMPTS, max_new_tokens=N, temperature=1.0, n=G, seed=5)
  for r in range(len(PROMPTS) * G):
    assert out.input_ids[r][out.completion_mask[r] > 0].tolist() == ref.tokens[r]


def test_completion_mask_runs_through_eos_and_stops(lm, batch):
  free = rollout(lm, batch, temperature=0.0, stop_token_ids=())  # no stop: N tokens each
  prompt_len = batch["prompt_attention_mask"].sum(1).repeat(G)
  completions = [free.input_ids[r, prompt_len[r]:prompt_len[r] + N] for r in range(len(free.input_ids))]
  eos = int(completions[0][2])  # a token greedy decoding emits: make it the stop token
  out = rollout(lm, batch, temperature=0.0, stop_token_ids=(eos,))
  pad = lm.config.pad_token_id
  for r, completion in enumerate(completions):
    hits = np.flatnonzero(completion == eos)
    length = int(hits[0]) + 1 if len(hits) else N
    p = prompt_len[r]
    expected = np.zeros(out.input_ids.shape[1], np.int32)
    expected[p:p + length] = 1
    np.testing.assert_array_equal(out.completion_mask[r], expected)
    assert out.completion_lengths[r] == length and out.finished[r] == bool(len(hits))
    assert out.input_ids[r, p + length - 1] == eos or not len(hits)
    assert (out.input_ids[r, p + length:] == pad).all()
    np.testing.assert_array_equal(out.attention_mask[r], (np.arange(len(expected)) < p + length))
    np.testing.assert_array_equal(out.positions[r, :p + length], np.arange(p + length))
    prompt = batch["prompt_input_ids"][r // G][batch["prompt_attention_mask"][r // G] > 0]
    np.testing.assert_array_equal(out.input_ids[r, :p], prompt)  # prompt first, never masked in
  assert out.finished[0] and out.completion_lengths[0] <= 3


def test_same_key_same_rollout_other_key_other_samples(lm, batch):
  a, b, c = (rollout(lm, batch, seed=s, temperature=1.0) for s in (7, 7, 8))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.input_ids, c.input_ids)
  np.testing.assert_array_equal(a.prompt_index, np.arange(len(PROMPTS) * G) // G)


SHARDED = """
import jax, numpy as np
from jaxpost.algos.rollout import RolloutConfig, sample_rollout
from jaxpost.models.llama import LlamaForCausalLM, init_params
from jaxpost.train.sharding import DEFAULT_RULES, batch_sharding, build_mesh, param_shardings
from tests.test_generate import tiny_config, token_prompts
cfg = tiny_config(); model = LlamaForCausalLM(cfg)
params = jax.tree.map(lambda p: 3 * p, init_params(model, jax.random.PRNGKey(0)))
mesh = build_mesh({"data": 2, "fsdp": 2, "tensor": 2})
sharded = jax.device_put(params, param_shardings(model, mesh, DEFAULT_RULES))
ids = np.full((4, 16), 2, np.int32); mask = np.zeros((4, 16), np.int32)
for j, p in enumerate(token_prompts([3, 9, 5, 12], seed=2)):
  ids[j, 16 - len(p):], mask[j, 16 - len(p):] = p, 1
batch = {"prompt_input_ids": ids, "prompt_attention_mask": mask}
on_mesh = jax.device_put(batch, batch_sharding(mesh))
for t in (0.0, 1.0):
  config = RolloutConfig(num_generations=2, max_new_tokens=6, temperature=t)
  ref = sample_rollout(model, params, batch, jax.random.PRNGKey(1), config)
  out = sample_rollout(model, sharded, on_mesh, jax.random.PRNGKey(1), config, mesh=mesh)
  assert out.input_ids.sharding.is_equivalent_to(batch_sharding(mesh), 2), out.input_ids.sharding
  assert (np.asarray(out.input_ids) == np.asarray(ref.input_ids)).all(), (out.input_ids, ref.input_ids)
  assert np.abs(np.asarray(out.logprobs) - np.asarray(ref.logprobs)).max() < 1e-4
print("OK")
"""


def test_eight_devices_equal_one_device():
  run_on_fake_devices(SHARDED, devices=8)
