"""DPO / KTO / reward-model loop losses on a tiny random Llama, checked against full-logit math."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxpost.models.config import LlamaConfig
from jaxpost.models.heads import LlamaForScore
from jaxpost.models.llama import LlamaForCausalLM, init_params
from jaxpost.train.algorithms import LossContext
from jaxpost.algos.preference import (dpo_loss_fn, kto_loss_fn, mismatched_pairs, pair_scores,
                                      reference_logps, reward_loss_fn, sequence_stats)

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
T = 12


def encode(prompt, completion):
  """Five right-padded fields of one prompt+completion row."""
  ids = np.zeros(T, np.int32)
  n = len(prompt) + len(completion)
  ids[:n] = prompt + completion
  mask = (np.arange(T) < n).astype(np.int32)
  loss = ((np.arange(T) >= len(prompt)) & (np.arange(T) < n)).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask, "positions": np.maximum(np.cumsum(mask) - 1, 0),
          "segment_ids": mask, "loss_mask": loss}


def stack(rows, prefix=""):
  return {prefix + k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def pair_batch(seed=0, n=3):
  rng = np.random.default_rng(seed)
  chosen, rejected = [], []
  for _ in range(n):
    prompt = list(rng.integers(1, 64, rng.integers(2, 5)))
    chosen.append(encode(prompt, list(rng.integers(1, 64, rng.integers(1, 5)))))
    rejected.append(encode(prompt, list(rng.integers(1, 64, rng.integers(1, 7)))))
  return {**stack(chosen, "chosen_"), **stack(rejected, "rejected_")}


def pair_records(n, prompt_len, chosen_lens, rejected_len, seed):
  """`n` tokenised pair records (the loader's table rows): a shared prompt, a chosen completion
  of a length in [chosen_lens), a rejected one of `rejected_len`."""
  rng = np.random.default_rng(seed)
  records = []
  for _ in range(n):
    prompt = list(rng.integers(1, 64, prompt_len))
    c = list(rng.integers(1, 64, rng.integers(*chosen_lens)))
    r = list(rng.integers(1, 64, rejected_len))
    records.append({"chosen_ids": np.asarray(prompt + c), "rejected_ids": np.asarray(prompt + r),
                    "chosen_mask": np.asarray([0] * prompt_len + [1] * len(c)),
                    "rejected_mask": np.asarray([0] * prompt_len + [1] * rejected_len),
                    "margin": np.nan})
  return records


def ctx(model, ref_model=None, **config):
  config = ml_collections.ConfigDict({"beta": 0.1, "loss_type": "sigmoid", **config})
  return LossContext(model=model, config=config, modules={"ref": ref_model or model})


def init(model, seed):
  return jax.jit(lambda key: init_params(model, key))(jax.random.PRNGKey(seed))


def jitted(loss_fn, c):
  """The loop's view of a loss: traced once under jit (eager Flax dispatch is slow on CPU)."""
  return jax.jit(lambda params, frozen, batch: loss_fn(params, frozen, batch, None, c))


@pytest.fixture(scope="module")
def lm():
  model = LlamaForCausalLM(CFG)
  return model, init(model, 0), init(model, 1)


def full_logit_stats(model, params, ids, mask, loss_mask):
  """Summed completion log-probs and vocabulary-mean logit sums from the full [B, T, V] logits."""
  logits = np.asarray(model.apply({"params": params}, ids, mask), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  target = np.take_along_axis(logp[:, :-1], np.asarray(ids)[:, 1:, None], -1)[..., 0]
  m = np.asarray(loss_mask)[:, 1:]
  return (target * m).sum(-1), (logits.mean(-1)[:, :-1] * m).sum(-1)


def test_dpo_policy_equals_reference_and_metrics(lm):
  model, params, _ = lm
  batch = pair_batch()
  loss, m = jitted(dpo_loss_fn, ctx(model))(params, {"ref": params}, batch)
  assert float(loss) == pytest.approx(np.log(2), rel=1e-6)
  assert float(m["rewards/accuracies"]) == 0.0 and float(m["rewards/margins"]) == 0.0
  for side in ("chosen", "rejected"):
    logps, logit_sums = full_logit_stats(model, params, *(batch[f"{side}_{k}"] for k in
                                                          ("input_ids", "attention_mask",
                                                           "loss_mask")))
    n = np.asarray(batch[f"{side}_loss_mask"]).sum()
    assert float(m[f"logps/{side}"]) == pytest.approx(logps.mean(), rel=1e-5)
    assert float(m[f"logits/{side}"]) == pytest.approx(logit_sums.sum() / n, rel=1e-4, abs=1e-6)


def test_precomputed_reference_equals_on_the_fly(lm):
  model, params, ref = lm
  batch = pair_batch(1)
  for loss_type in ("sigmoid", "ipo"):
    fn = jitted(dpo_loss_fn, ctx(model, loss_type=loss_type))
    on_the_fly = fn(params, {"ref": ref}, batch)
    rc, rr = jax.jit(lambda p, b: reference_logps(model, p, b))(ref, batch)
    cached = {**batch, "ref_chosen_logps": np.asarray(rc), "ref_rejected_logps": np.asarray(rr)}
    precomputed = fn(params, {}, cached)
    np.testing.assert_allclose(on_the_fly[0], precomputed[0], rtol=1e-6)
    assert float(on_the_fly[1]["rewards/margins"]) != 0.0


def test_reference_free_and_missing_reference(lm):
  model, params, _ = lm
  batch = pair_batch()
  loss, _ = jitted(dpo_loss_fn, ctx(model, loss_type="simpo", beta=2.0))(params, {}, batch)
  assert np.isfinite(float(loss))
  with pytest.raises(ValueError, match="config.ref"):
    jitted(dpo_loss_fn, ctx(model))(params, {}, batch)
  with pytest.raises(ValueError, match="algorithm='kto'"):
    jitted(dpo_loss_fn, ctx(model, loss_type="kto"))(params, {}, batch)


def test_mismatched_pairs():
  batch = stack([encode([1, 2], [3, 4, 5]), encode([6, 7, 8], [9]), encode([10], [11, 12])])
  kl = {k: np.asarray(v) for k, v in mismatched_pairs(batch).items()}
  np.testing.assert_array_equal(kl["input_ids"][:, :6], [[1, 2, 11, 12, 0, 0],
                                                         [6, 7, 8, 3, 4, 5],
                                                         [10, 9, 0, 0, 0, 0]])
  np.testing.assert_array_equal(kl["loss_mask"][:, :6], [[0, 0, 1, 1, 0, 0],
                                                         [0, 0, 0, 1, 1, 1],
                                                         [0, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(kl["attention_mask"].sum(-1), [4, 6, 2])
  np.testing.assert_array_equal(kl["positions"][1, :6], np.arange(6))


def test_kto_loss_fn(lm):
  model, params, ref = lm
  rows = stack([encode([1, 2], [3, 4, 5]), encode([6, 7, 8], [9]), encode([10], [11, 12])])
  batch = {**rows, "label": jnp.asarray([1, 0, 1])}
  c = ctx(model, loss_type="kto")
  fn = jitted(kto_loss_fn, c)
  loss, m = fn(params, {"ref": params}, batch)
  assert float(loss) == pytest.approx(0.5, abs=1e-6)
  assert float(m["kl"]) == pytest.approx(0, abs=1e-5)
  loss, m = fn(params, {"ref": ref}, batch)
  kl_logps = jax.jit(lambda p: sequence_stats(model, p, mismatched_pairs(rows))["logps"])
  z = float(jnp.mean(kl_logps(params) - kl_logps(ref)))
  assert float(m["kl"]) == pytest.approx(max(z, 0.0), rel=1e-4, abs=1e-6)
  g = jax.jit(jax.grad(lambda p: kto_loss_fn(p, {"ref": ref}, batch, None, c)[0]))(params)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))


def test_reward_scores_and_loss():
  model = LlamaForScore(CFG)
  params = init(model, 2)
  batch = {**pair_batch(2), "margin": jnp.asarray([np.nan, 1.0, 0.5])}  # NaN: no margin
  rc, rr = jax.jit(lambda p, b: pair_scores(model, p, b))(params, batch)
  alone = jax.jit(model.apply)({"params": params}, batch["chosen_input_ids"],
                               batch["chosen_attention_mask"])
  last = np.asarray(batch["chosen_attention_mask"]).sum(-1) - 1
  np.testing.assert_allclose(rc, np.asarray(alone)[np.arange(3), last], rtol=1e-5, atol=1e-6)
  loss, m = jitted(reward_loss_fn, LossContext(
      model, ml_collections.ConfigDict({"center_rewards_coefficient": 0.01})))(params, {}, batch)
  diff = np.asarray(rc - rr) - np.asarray([0.0, 1.0, 0.5])
  want = np.mean(np.log1p(np.exp(-diff))) + 0.01 * np.mean(np.asarray(rc + rr) ** 2)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(m["accuracy"]) == pytest.approx(np.mean(np.asarray(rc > rr)))


def test_reference_cache(lm, tmp_path):
  from types import SimpleNamespace

  from jaxpost.data import batching
  from jaxpost.data.loader import Stream
  from jaxpost.algos.preference import add_cached_reference
  from jaxpost.algos.ref_cache import RefCache
  model, _, ref = lm
  records = pair_records(5, prompt_len=3, chosen_lens=(1, 4), rejected_len=5, seed=5)
  stream = Stream([np.arange(5)], [1.0], seed=0, shuffle=True)
  loader = SimpleNamespace(table=SimpleNamespace(records=records), batch_size=2, buckets=(8, 16),
                           pad_id=0, fingerprint="data", stream=stream)
  score = jax.jit(lambda b: reference_logps(model, ref, b))
  cache = RefCache.build(score, loader, str(tmp_path), "ref", draws=10)  # 2 epochs: all 5
  assert len(cache.table) == 5 and len(list((tmp_path / "ref_logps").glob("*.npz"))) == 1
  # A training batch with other rows, order and padding finds the same values.
  batch = batching.preference_batch([records[3], records[0]], (16,), 0)
  with_ref = add_cached_reference(batch, {}, LossContext(model, None, True,
                                                        {"ref_cache": cache}))
  rc, rr = score(batch)
  np.testing.assert_allclose(with_ref["ref_chosen_logps"], rc, rtol=1e-5)
  np.testing.assert_allclose(with_ref["ref_rejected_logps"], rr, rtol=1e-5)
  # A rerun reads the file instead of scoring again.
  def no_scoring(batch):
    raise AssertionError("scored again")
  again = RefCache.build(no_scoring, loader, str(tmp_path), "ref", draws=10)
  assert again.table.keys() == cache.table.keys()
  plain = add_cached_reference(batch, {}, LossContext(model, None))
  assert "ref_chosen_logps" not in plain


@pytest.mark.slow
def test_task_report_runs_greedy_generation():
  from jaxpost.hf import LoadedModel, load_tokenizer, resolve_model_dir
  from jaxpost.train.report import task_report
  tokenizer = load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))
  cfg = CFG.replace(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
  model = LlamaForCausalLM(cfg)
  policy = LoadedModel(model, None, tokenizer, cfg)
  config = ml_collections.ConfigDict({"report": {"task": "arithmetic", "examples": 4,
                                                 "max_new_tokens": 3}})
  out = task_report(policy, init(model, 6), config)
  assert set(out) == {"task/accuracy", "task/concise"}
  assert all(0.0 <= v <= 1.0 for v in out.values())
  config.report.task = ""
  assert task_report(policy, None, config) == {}


def test_default_buckets_pad_less_with_the_same_loss_and_gradient(lm):
  """The default buckets (multiples of max_length / 8) pad a batch of short pairs to 16 of
  max_length 64, and the DPO loss, metrics and gradient equal those of the batch padded to 64."""
  from jaxpost.data import batching
  model, params, ref = lm
  records = pair_records(3, prompt_len=4, chosen_lens=(2, 10), rejected_len=8, seed=7)
  tight = batching.preference_batch(records, batching.resolve_buckets(None, 64), 0)
  padded = batching.preference_batch(records, (64,), 0)
  assert tight["chosen_input_ids"].shape == (3, 16) and padded["chosen_input_ids"].shape == (3, 64)
  fn = jax.jit(jax.value_and_grad(
      lambda p, b: dpo_loss_fn(p, {"ref": ref}, b, None, ctx(model)), has_aux=True))
  (loss_t, m_t), g_t = fn(params, tight)
  (loss_p, m_p), g_p = fn(params, padded)
  np.testing.assert_allclose(loss_t, loss_p, rtol=1e-6)
  assert float(m_t["rewards/margins"]) != 0.0
  for k in m_t:
    np.testing.assert_allclose(m_t[k], m_p[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_t, g_p)


def test_recipe_remat_policy_keeps_the_dpo_loss_and_gradient(lm):
  """configs/dpo.py's remat policy (recompute the attention in the backward pass) gives the loss,
  metrics and gradient of the model without remat."""
  import dataclasses
  import jaxpost.configs
  policy = jaxpost.configs.get("dpo").model.remat_policy
  assert policy != "none"
  model, params, ref = lm
  remat = LlamaForCausalLM(dataclasses.replace(CFG, remat_policy=policy))
  batch = pair_batch(2)
  grads = lambda m: jax.jit(jax.value_and_grad(
      lambda p: dpo_loss_fn(p, {"ref": ref}, batch, None, ctx(m)), has_aux=True))(params)
  (loss, metrics), g = grads(model)
  (loss_r, metrics_r), g_r = grads(remat)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  for k in metrics:
    np.testing.assert_allclose(metrics_r[k], metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_r, g)
