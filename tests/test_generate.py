"""Generation engine: parity with transformers' greedy generate, exact log-probs, sampling filters,
stop handling, batching invariance, bucketed compiles, bad input and mesh sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import generate as generate_module
from jaxpost.generate import generate, run, sample_tokens, start
from jaxpost.hf import LoadedModel, load_tokenizer
from jaxpost.models.config import LlamaConfig
from jaxpost.models.llama import LlamaForCausalLM, init_params
from tests.conftest import run_on_fake_devices

VOCAB = 49152  # the bundled tokenizer's, so text prompts and stop strings work on a tiny model
CHAT = ["What is the capital of France?", "Write a haiku about the sea.",
        "List three prime numbers.", "Explain gravity to a child in one sentence.",
        "Translate 'good morning' into Spanish.", "What is 12 times 7?",
        "Give me a tip for learning to code.", "Name a famous painter and one painting."]


def tiny_config(**kw):
  return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     max_position_embeddings=128, tie_word_embeddings=True, eos_token_id=2,
                     pad_token_id=2, **kw)


@pytest.fixture(scope="module")
def tiny(bundled_dir):
  cfg = tiny_config()
  model = LlamaForCausalLM(cfg)
  params = jax.tree.map(lambda p: 3 * p, init_params(model, jax.random.PRNGKey(0)))  # peakier
  return LoadedModel(model, params, load_tokenizer(bundled_dir), cfg)


def token_prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, VOCAB, size=n).tolist() for n in lengths]


def full_logprobs(lm, prompt, tokens):
  """log p(tokens[t] | prompt, tokens[:t]) from one full forward, no cache."""
  ids = np.asarray([prompt + tokens], np.int32)
  logits = lm.model.apply({"params": lm.params}, ids)[0]
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  return logp[np.arange(len(prompt) - 1, ids.shape[1] - 1), tokens], np.asarray(logits)


@pytest.mark.slow
def test_greedy_matches_transformers_on_bundled_model(bundled_dir):
  import torch
  import transformers
  import jaxpost
  lm = jaxpost.load_model("bundled:smollm2-135m-instruct")
  chats = CHAT[:4]  # four prompt lengths (left padding); answers short and long
  ours = generate(lm, [[{"role": "user", "content": c}] for c in chats], max_new_tokens=24)
  tok = transformers.AutoTokenizer.from_pretrained(str(bundled_dir), padding_side="left")
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(bundled_dir), dtype=torch.float32)
  texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                   add_generation_prompt=True) for c in chats]
  batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # 2 OpenMP threads crawl when other processes share the 2 cores
  try:
    with torch.no_grad():
      out = hf.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=2)
  finally:
    torch.set_num_threads(threads)
  for i in range(len(chats)):
    assert ours.prompt_tokens[i] == batch["input_ids"][i][batch["attention_mask"][i] > 0].tolist()
    ref = out[i, batch["input_ids"].shape[1]:].tolist()
    ref = ref[:ref.index(2) + 1] if 2 in ref else ref
    assert ours.tokens[i] == ref, (i, ours.texts[i], tok.decode(ref))
    assert ours.finish_reasons[i] == ("stop" if ref[-1] == 2 else "length")
  assert ours.texts[0].strip() == "The capital of France is Paris."
  assert set(ours.finish_reasons) == {"stop", "length"}  # both ends compared


MIXED = token_prompts([3, 12, 40], seed=2)  # prompt buckets 16, 16, 64 alone; 64 together
SAMPLING = dict(temperature=0.7, top_k=40)


def test_raw_and_sampling_logprobs_match_full_forward(tiny):
  out = generate(tiny, MIXED[:2], max_new_tokens=12, n=2, seed=3, **SAMPLING)
  assert len(out) == 4 and out.prompt_index == [0, 0, 1, 1]
  assert out.tokens[0] != out.tokens[1]  # the n samples differ
  for i, tokens in enumerate(out.tokens):
    prompt = MIXED[i // 2]
    raw, logits = full_logprobs(tiny, prompt, tokens)
    np.testing.assert_allclose(out.logprobs[i], raw, atol=1e-4)
    # q = softmax over the top-k of logits / T, by hand.
    z = logits[len(prompt) - 1:-1] / SAMPLING["temperature"]
    z = np.where(z >= np.sort(z, -1)[:, -SAMPLING["top_k"]][:, None], z, -np.inf)
    q = z - z.max(-1, keepdims=True)
    q -= np.log(np.exp(q).sum(-1, keepdims=True))
    np.testing.assert_allclose(out.sampling_logprobs[i], q[np.arange(len(tokens)), tokens],
                               atol=1e-4)
  same = generate(tiny, MIXED[:2], max_new_tokens=12, n=2, seed=3, **SAMPLING)
  other = generate(tiny, MIXED[:2], max_new_tokens=12, n=2, seed=4, **SAMPLING)
  assert same.tokens == out.tokens and other.tokens != out.tokens


def test_draw_tokens_follows_the_softmax(monkeypatch):
  """The two-level inverse-CDF sampler: over 200k draws every id's frequency is within 4.5
  sigma of softmax(logits) (ids in 3 full blocks and a partial one), -inf ids are never drawn,
  and a one-hot row always gives its id."""
  monkeypatch.setattr(generate_module, "SAMPLING_BLOCK", 16)
  vocab, draws = 50, 200_000
  logits = np.random.default_rng(0).normal(size=vocab).astype(np.float32) * 1.5
  logits[[0, 17, 31, 32, 49]] = -np.inf
  p = np.exp(logits - logits[np.isfinite(logits)].max())
  p /= p.sum()
  keys = jax.random.split(jax.random.PRNGKey(0), draws)
  ids = np.asarray(generate_module.draw_tokens(keys, jnp.broadcast_to(jnp.asarray(logits),
                                                                    (draws, vocab))))
  freq = np.bincount(ids, minlength=vocab) / draws
  assert freq[p == 0].sum() == 0 and ids.max() < vocab
  np.testing.assert_array_less(np.abs(freq - p), 4.5 * np.sqrt(p * (1 - p) / draws) + 1e-9)
  one_hot = np.full((4, vocab), -np.inf, np.float32)
  one_hot[:, 33] = 0.0
  assert (np.asarray(generate_module.draw_tokens(keys[:4], jnp.asarray(one_hot))) == 33).all()


def test_decode_layers_are_reused_until_the_params_change(tiny):
  """The unstacked decode weights are split once per params: a second call reuses them, and
  new params (`lm.params = ...`) are split again, so the tokens are those of the new params."""
  import dataclasses
  from jaxpost.generate import decode_layers
  lm = dataclasses.replace(tiny)
  first = generate(lm, MIXED[:2], max_new_tokens=8)
  layers = decode_layers(lm)
  assert generate(lm, MIXED[:2], max_new_tokens=8).tokens == first.tokens
  assert decode_layers(lm) is layers
  lm.params = jax.tree.map(lambda p: -p, tiny.params)
  changed = generate(lm, MIXED[:2], max_new_tokens=8)
  assert decode_layers(lm) is not layers
  assert changed.tokens == generate(dataclasses.replace(tiny, params=lm.params), MIXED[:2],
                                    max_new_tokens=8).tokens
  assert changed.tokens != first.tokens
  for tokens, prompt, logprobs in zip(changed.tokens, MIXED[:2], changed.logprobs):
    np.testing.assert_allclose(logprobs, full_logprobs(lm, prompt, tokens)[0], atol=1e-4)


def test_mixed_prompt_lengths_equal_each_prompt_alone(tiny):
  batch = generate(tiny, MIXED, max_new_tokens=16)
  for i, prompt in enumerate(MIXED):
    alone = generate(tiny, [prompt], max_new_tokens=16)
    assert alone.tokens[0] == batch.tokens[i]
    np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[i], atol=1e-4)
  assert batch.sampling_logprobs[0].tolist() == [0.0] * 16  # greedy: q is a point mass
  for filt in (dict(top_k=1), dict(top_p=1e-6)):
    out = generate(tiny, MIXED, max_new_tokens=16, temperature=1.0, seed=7, **filt)
    assert out.tokens == batch.tokens, filt
    np.testing.assert_allclose(np.concatenate(out.sampling_logprobs), 0.0, atol=1e-6)


def test_stop_strings_and_stop_tokens_cut_exactly(tiny):
  kw = dict(max_new_tokens=40, temperature=1.0, seed=5)
  free = generate(tiny, ["Hello there"], **kw)
  text, tokens = free.texts[0], free.tokens[0]
  stop = text[15:18]
  cut = text.index(stop)
  out = generate(tiny, ["Hello there"], stop_strings=["zzzzzz", stop], **kw)
  assert out.texts[0] == text[:cut] and out.finish_reasons[0] == "stop"
  k = out.lengths[0]
  assert out.tokens[0] == tokens[:k]  # same samples up to the cut, ending on the completing token
  decode = lambda ids: tiny.tokenizer.decode(ids, skip_special_tokens=True)
  assert stop in decode(tokens[:k]) and stop not in decode(tokens[:k - 1])
  assert len(out.logprobs[0]) == k
  # An extra stop token: kept as the last token, left out of the text.
  stop_id = tokens[5]
  first = tokens.index(stop_id)
  out = generate(tiny, ["Hello there"], stop_token_ids=[stop_id], **kw)
  assert out.tokens[0] == tokens[:first + 1] and out.finish_reasons[0] == "stop"
  assert out.texts[0] == decode(tokens[:first])
  assert generate(tiny, ["Hello there"], **kw).finish_reasons == ["length"]


def test_prompt_forms_and_chat_template(tiny):
  msg = [{"role": "user", "content": "Hi!"}]
  a = generate(tiny, [msg], max_new_tokens=4)
  b = generate(tiny, "Hi!", max_new_tokens=4)  # a string gets the chat template
  c = generate(tiny, [a.prompt_tokens[0]], max_new_tokens=4)
  assert a.prompt_tokens == b.prompt_tokens == c.prompt_tokens and a.tokens == b.tokens == c.tokens
  raw = generate(tiny, ["Hi!"], max_new_tokens=4, chat_template=False)
  assert raw.prompt_tokens[0] == tiny.tokenizer.encode("Hi!")


def test_sample_tokens_under_jit_matches_generate(tiny):
  prompts = token_prompts([6, 11], seed=4)
  ids = np.full((2, 16), 2, np.int32)
  mask = np.zeros((2, 16), np.int32)
  for j, p in enumerate(prompts):
    ids[j, 16 - len(p):], mask[j, 16 - len(p):] = p, 1

  @jax.jit
  def rollout(params, ids, mask, rng):
    return sample_tokens(tiny.model, params, ids, mask, rng, max_new_tokens=8, temperature=0.9,
                         top_p=0.95)
  out = jax.device_get(rollout(tiny.params, ids, mask, jax.random.PRNGKey(11)))
  ref = generate(tiny, prompts, max_new_tokens=8, temperature=0.9, top_p=0.95, seed=11)
  for j in range(2):
    assert out["tokens"][j, :out["lengths"][j]].tolist() == ref.tokens[j]
    np.testing.assert_allclose(out["logprobs"][j, :out["lengths"][j]], ref.logprobs[j], atol=1e-5)
  assert out["mask"].sum(1).tolist() == list(out["lengths"])


def test_shapes_are_bucketed(tiny):
  go = lambda lengths, k, t: generate(tiny, token_prompts(lengths), max_new_tokens=k,
                                      temperature=t, top_k=SAMPLING["top_k"])
  go([20, 9, 3, 5], 10, 0.5)
  sizes = lambda: (run._cache_size(), start._cache_size())
  before = sizes()
  go([32, 3, 4], 14, 0.9)  # same batch (4), prompt (32) and new-token (16) buckets
  go([17], 16, 1.3)  # a lone prompt: batch bucket 1
  assert sizes() == (before[0] + 1, before[1] + 1)
  go([18], 5, 1.0)
  assert sizes() == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize("prompts, kw, match", [
    ([""], {}, "prompt 0 is an empty string"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[]], {}, "prompt 0"),
    ([], {}, "prompts is empty"),
    ([[5] * 100], dict(max_new_tokens=40), "exceed the model's context"),
    ([[5]], dict(temperature=-0.1), "temperature"),
    ([[5]], dict(top_p=0.0), "top_p"),
    ([[5]], dict(top_p=1.5), "top_p"),
    ([[5]], dict(stop_token_ids=[VOCAB + 3]), "stop token id"),
    ([[5]], dict(stop_strings=[""]), "stop_strings"),
    ([[5, VOCAB]], {}, "outside"),
    ([3.5], {}, "prompt 0 must be"),
])
def test_bad_input_fails_before_compiling(tiny, prompts, kw, match):
  sizes = start._cache_size(), run._cache_size()
  with pytest.raises(ValueError, match=match):
    generate(tiny, prompts, **{"max_new_tokens": 4, **kw})
  assert (start._cache_size(), run._cache_size()) == sizes


SHARDED = r"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxpost.generate import generate
from jaxpost.hf import LoadedModel
from jaxpost.models.llama import LlamaForCausalLM, init_params
from tests.test_generate import tiny_config, token_prompts
cfg = tiny_config(); model = LlamaForCausalLM(cfg)
params = init_params(model, jax.random.PRNGKey(0))
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
emb = NamedSharding(mesh, P("fsdp", None))
sharded = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P())), params)
sharded["model"]["embed_tokens"]["embedding"] = jax.device_put(
    params["model"]["embed_tokens"]["embedding"], emb)
kw = dict(max_new_tokens=6, temperature=1.0, seed=1)
prompts = token_prompts([3, 8, 5])
ref = generate(LoadedModel(model, params, None, cfg), prompts, **kw)
out = generate(LoadedModel(model, sharded, None, cfg), prompts, mesh=mesh,
                   batch_axes=("data",), **kw)
assert out.tokens == ref.tokens, (out.tokens, ref.tokens)
assert sharded["model"]["embed_tokens"]["embedding"].sharding == emb
print("OK")
"""


def test_batch_sharded_over_mesh_matches_single_device():
  run_on_fake_devices(SHARDED, devices=4, timeout=300)
