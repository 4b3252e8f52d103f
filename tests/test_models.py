"""Model parity with transformers for every supported family, masks, packing and the KV cache."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxpost
from jaxpost.models import llama
from jaxpost.models.llama import init_cache
from tests.conftest import FAMILIES, make_hf_model

B, T = 3, 12


def _batch(side: str, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 128, size=(B, T)).astype(np.int32)
  lengths = np.array([T, T - 4, T - 7])
  mask = np.zeros((B, T), np.int32)
  for b, n in enumerate(lengths):
    if side == "right":
      mask[b, :n] = 1
    else:
      mask[b, T - n:] = 1
  return ids, mask


def _torch_logits(model, ids, mask):
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  ref = make_hf_model(request.param, path)
  return request.param, path, ref


@pytest.mark.parametrize("side", ["right", "left", "none"])
def test_logits_match_transformers(family_model, side):
  _, path, ref = family_model
  ids, mask = _batch("right" if side == "none" else side)
  if side == "none":
    mask = np.ones_like(mask)
  expected = _torch_logits(ref, ids, mask)
  for scan in (True, False):
    lm = jaxpost.load_model(str(path), scan_layers=scan, tokenizer=False)
    got = np.asarray(lm.model.apply({"params": lm.params}, ids, attention_mask=mask))
    real = mask.astype(bool)
    np.testing.assert_array_less(np.abs(got - expected)[real].max(), 1e-4)


def test_remat_policy_does_not_change_logits(family_model):
  _, path, _ = family_model
  ids, mask = _batch("left")
  plain = jaxpost.load_model(str(path), tokenizer=False)
  remat = jaxpost.load_model(str(path), remat_policy="dots", tokenizer=False)
  a = plain.model.apply({"params": plain.params}, ids, attention_mask=mask)
  b = remat.model.apply({"params": remat.params}, ids, attention_mask=mask)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_packed_row_equals_separate_rows(family_model):
  _, path, _ = family_model
  lm = jaxpost.load_model(str(path), tokenizer=False)
  apply = lambda *a, **k: np.asarray(lm.model.apply({"params": lm.params}, *a, **k))
  rng = np.random.default_rng(1)
  first, second = rng.integers(3, 128, 7), rng.integers(3, 128, 5)
  packed = np.concatenate([first, second])[None].astype(np.int32)
  segments = np.array([[1] * 7 + [2] * 5], np.int32)
  positions = np.array([list(range(7)) + list(range(5))], np.int32)
  out = apply(packed, attention_mask=np.ones_like(packed), positions=positions,
              segment_ids=segments)
  alone_first = apply(first[None].astype(np.int32))
  alone_second = apply(second[None].astype(np.int32))
  np.testing.assert_allclose(out[0, :7], alone_first[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 7:], alone_second[0], atol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_kv_cache_decode_matches_full_forward(family_model, scan):
  """Prefill a left-padded batch, then decode one token per call; each step's logits equal
  the full forward's logits at that position."""
  _, path, _ = family_model
  lm = jaxpost.load_model(str(path), scan_layers=scan, tokenizer=False)
  ids, mask = _batch("left", seed=2)
  full = np.asarray(lm.model.apply({"params": lm.params}, ids, attention_mask=mask))
  prefill = 6
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  cache = init_cache(lm.config, B, T)
  kv_mask = np.zeros((B, T), np.int32)
  kv_mask[:, :prefill] = mask[:, :prefill]
  variables = {"params": lm.params}
  logits, cache = lm.model.apply(variables, ids[:, :prefill], positions[:, :prefill], kv_mask,
                                 cache, 0, method="decode")
  real = mask[:, :prefill].astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], full[:, :prefill][real], atol=1e-5)
  for t in range(prefill, T):
    kv_mask[:, t] = mask[:, t]
    logits, cache = lm.model.apply(variables, ids[:, t:t + 1], positions[:, t:t + 1], kv_mask,
                                   cache, t, method="decode")
    real = mask[:, t].astype(bool)  # a padding query's output is meaningless by design
    np.testing.assert_allclose(np.asarray(logits)[real, 0], full[real, t], atol=1e-5)


def _dense_attention(q, k, v, mask):
  """float64 softmax(q k^T / sqrt(d) + mask) v, q [B, T, KV, G, D], k, v [B, S, KV, D]."""
  scores = np.einsum("btkgd,bskd->bkgts", q.astype(np.float64), k) / np.sqrt(q.shape[-1])
  scores = np.where(mask, scores, -np.inf)
  with np.errstate(invalid="ignore"):  # a query with no keys (padding) gives NaN, not compared
    probs = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum("bkgts,bskd->btkgd", probs / probs.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("cache_index", [0, 5])
def test_attention_chunks_and_single_queries_equal_dense_softmax(monkeypatch, cache_index):
  """`attend`'s query chunks (each against the keys up to its last slot) and its one-query
  decode path equal a float64 dense softmax, under causal, padding, segment, branch and
  sliding-window masks (training: cache_index 0, S = T) or a cache at an offset."""
  monkeypatch.setattr(llama, "ATTENTION_QUERY_CHUNK", 4)
  rng = np.random.default_rng(0)
  b, t, kv, g, d = 2, 11, 2, 3, 8
  slots = t if cache_index == 0 else cache_index + t + 3
  q = rng.normal(size=(b, t, kv, g, d)).astype(np.float32)
  k, v = (rng.normal(size=(b, slots, kv, d)).astype(np.float32) for _ in range(2))
  kv_mask = np.ones((b, slots), np.int32)
  kv_mask[1, :2] = 0
  extra = {}
  if cache_index == 0:
    extra = dict(segment_ids=np.repeat([[1] * 7 + [2] * 4], b, 0),
                 branch_ids=np.repeat([[0, 0, 0, 1, 1, 2, 2, 0, 1, 1, 2]], b, 0),
                 positions=np.repeat([[0, 1, 2, 3, 4, 3, 4, 0, 1, 2, 1]], b, 0),
                 sliding_window=4)
  mask = np.asarray(llama.build_mask(jnp.asarray(kv_mask), cache_index, t, **extra))
  want = _dense_attention(q, k, v, mask[:, 0, 0][:, None, None])
  seen = mask[:, 0, 0].any(-1)  # [B, T]: queries with at least one key (others are padding)
  got = np.asarray(llama.attend(q, k, v, mask, cache_index))
  np.testing.assert_allclose(got[seen], want[seen], atol=1e-5)
  for i in range(t):  # one query at a time, as decoding runs
    one = np.asarray(llama.attend(q[:, i:i + 1], k, v, mask[..., i:i + 1, :], cache_index + i))
    np.testing.assert_allclose(one[seen[:, i], 0], want[seen[:, i], i], atol=1e-5)
