"""Buckets, padding, first-fit-decreasing packing; a packed row computes what separate rows do."""

import chex
import jax
import numpy as np
import pytest

from jaxpost.data.batching import (bucket_for, ffd_pack, pack_rows, pad_rows, preference_batch,
                                   prompt_batch, resolve_buckets)
from jaxpost.models.config import LlamaConfig
from jaxpost.models.llama import LlamaForCausalLM, init_params


def _seq(n, start=1):
  ids = np.arange(start, start + n, dtype=np.int32)
  return ids, np.ones(n, np.int8)


def test_buckets():
  assert resolve_buckets(None, 1024) == (128, 256, 384, 512, 640, 768, 896, 1024)
  assert resolve_buckets(None, 128) == (16, 32, 48, 64, 80, 96, 112, 128)
  assert resolve_buckets(None, 100) == (16, 32, 48, 64, 80, 96, 100)
  assert resolve_buckets(None, 4) == (4,)
  assert resolve_buckets([64, 2048, 128, 4096], 1000) == (64, 128, 2048)
  assert resolve_buckets([64], 100) == (64, 100)
  assert bucket_for(65, (64, 128)) == 128 and bucket_for(64, (64, 128)) == 64
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    bucket_for(129, (64, 128))


def test_pad_rows_fields():
  b = pad_rows([_seq(3), _seq(5, 10)], 8, pad_id=0)
  np.testing.assert_array_equal(b["input_ids"][1], [10, 11, 12, 13, 14, 0, 0, 0])
  np.testing.assert_array_equal(b["attention_mask"][0], [1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(b["positions"][1], [0, 1, 2, 3, 4, 0, 0, 0])
  np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(b["loss_mask"][0], [0, 1, 1, 0, 0, 0, 0, 0])
  assert all(v.dtype == np.int32 and v.shape == (2, 8) for v in b.values())


def test_ffd_pack():
  lengths = [3, 7, 2, 5, 4, 6]
  bins, unplaced = ffd_pack(lengths, 10, 2)
  # decreasing: 7->b0, 6->b1, 5->none, 4->b1, 3->b0, 2->none (b0=10, b1=10)
  assert bins == [[1, 0], [5, 4]] and unplaced == [2, 3]
  bins, unplaced = ffd_pack([2, 9, 8], 10, 2, n_first=1)  # carried item 0 goes first
  assert bins == [[0, 2], [1]] and unplaced == []
  lengths = list(np.random.default_rng(0).integers(1, 50, 40))
  bins, unplaced = ffd_pack(lengths, 64, 8)
  assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
  assert sorted(sum(bins, []) + unplaced) == list(range(40))
  assert all(lengths[i] > 64 - sum(lengths[j] for j in b) for i in unplaced for b in bins)


def test_pack_rows_segments():
  b = pack_rows([[_seq(3), _seq(2, 20)], [_seq(4, 30)]], 6, pad_id=0)
  np.testing.assert_array_equal(b["input_ids"][0], [1, 2, 3, 20, 21, 0])
  np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 0, 1, 0])
  np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 2, 2, 0])
  np.testing.assert_array_equal(b["loss_mask"][0], [0, 1, 1, 0, 1, 0])  # no loss across segments
  with pytest.raises(ValueError, match="exceed T=6"):
    pack_rows([[_seq(4), _seq(3)]], 6, 0)


def test_preference_and_prompt_batches():
  recs = [{"chosen_ids": _seq(3)[0], "chosen_mask": np.array([0, 0, 1], np.int8),
           "rejected_ids": _seq(9)[0], "rejected_mask": np.array([0, 0] + [1] * 7, np.int8),
           "margin": np.float32(np.nan)}]
  b = preference_batch(recs, (4, 16), pad_id=0)
  assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == (1, 16)
  assert np.isnan(b["margin"][0]) and b["chosen_loss_mask"].sum() == 1
  p = prompt_batch([{"prompt_ids": _seq(2)[0]}, {"prompt_ids": _seq(3, 7)[0]}], [5, 9], (4,), 0)
  np.testing.assert_array_equal(p["prompt_input_ids"], [[0, 0, 1, 2], [0, 7, 8, 9]])
  np.testing.assert_array_equal(p["prompt_attention_mask"], [[0, 0, 1, 1], [0, 1, 1, 1]])
  np.testing.assert_array_equal(p["row"], [5, 9])


def test_packed_forward_equals_separate_forwards():
  cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  model = LlamaForCausalLM(cfg)
  params = init_params(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  seqs = [(rng.integers(0, 256, n).astype(np.int32), np.ones(n, np.int8)) for n in (7, 4, 9, 5, 3)]
  lengths = [len(s[0]) for s in seqs]
  bins, unplaced = ffd_pack(lengths, 16, 2)
  assert not unplaced and sum(len(b) for b in bins) == 5
  packed = pack_rows([[seqs[i] for i in b] for b in bins], 16, pad_id=0)
  apply = jax.jit(lambda *a: model.apply({"params": params}, *a))
  logits = apply(packed["input_ids"], packed["attention_mask"], packed["positions"],
                 packed["segment_ids"])
  alone = pad_rows(seqs, 16, pad_id=0)  # one example per row (right padding is causal-safe)
  ref = apply(alone["input_ids"], alone["attention_mask"], alone["positions"],
              alone["segment_ids"])
  for r, b in enumerate(bins):
    start = 0
    for i in b:
      n = lengths[i]
      chex.assert_trees_all_close(logits[r, start:start + n], ref[i, :n], atol=1e-5, rtol=1e-5)
      start += n
  # without segments the second example of row 0 would attend to the first: logits differ
  flat = apply(packed["input_ids"], packed["attention_mask"], packed["positions"],
               packed["attention_mask"])
  n0, n1 = lengths[bins[0][0]], lengths[bins[0][1]]
  assert not np.allclose(flat[0, n0:n0 + n1], logits[0, n0:n0 + n1], atol=1e-3)
