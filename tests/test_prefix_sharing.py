"""Prefix-shared pairs (data.prefix_sharing) compute exactly what the unshared 2B rows compute.

Every test builds the same random pairs in both layouts (data/batching.py) and compares
per-completion log-probs, DPO losses / metrics / gradients and reward-model scores at fp32
rounding, on tiny random models.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpost
from jaxpost.algos import preference
from jaxpost.configs import dpo as dpo_config
from jaxpost.data import batching
from jaxpost.losses.dpo import LOSS_TYPES, PreferenceLossConfig, preference_loss
from jaxpost.losses.logprobs import predecessor_index
from jaxpost.models import lora
from jaxpost.models.config import LlamaConfig
from jaxpost.models.heads import LlamaForScore
from jaxpost.models.llama import LlamaForCausalLM, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, PAD = 128, 0
BUCKETS = (16, 32, 48)
TOL = dict(rtol=1e-5, atol=1e-5)
REF = (jnp.linspace(-40, -20, 6), jnp.linspace(-30, -35, 6))  # reference log-probs of 6 pairs


def tiny(module_cls=LlamaForCausalLM, seed=0, **overrides):
  cfg = LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=8), **overrides})
  module = module_cls(cfg)
  return module, init_params(module, jax.random.PRNGKey(seed))


def pair_records(n=6, seed=0, empty_prompt_at=None):
  """Preference records as the loader writes them: prompt + completion ids, mask on completions
  (never on token 0)."""
  rng = np.random.default_rng(seed)
  tokens = lambda k: rng.integers(3, VOCAB, k).astype(np.int32)
  out = []
  for i in range(n):
    prompt = tokens(0 if i == empty_prompt_at else rng.integers(3, 14))
    rec = {"margin": np.float32(np.nan)}
    for side in ("chosen", "rejected"):
      comp = tokens(rng.integers(2, 10))
      mask = np.r_[np.zeros(len(prompt)), np.ones(len(comp))].astype(np.int8)
      mask[0] = 0
      rec[side + "_ids"], rec[side + "_mask"] = np.r_[prompt, comp].astype(np.int32), mask
    out.append(rec)
  return out


def left_padded(batch, fields):
  """The rows of `batch` with their padding moved to the left (same tokens, same positions)."""
  out = dict(batch)
  for prefix in fields:
    n = np.asarray(batch[prefix + "attention_mask"]).sum(axis=1)
    for f in [k for k in batch if k.startswith(prefix) and np.ndim(batch[k]) == 2]:
      out[f] = np.stack([np.roll(row, len(row) - k) for row, k in zip(batch[f], n)])
  return out


def layouts(records, packing=False, left=False):
  unshared = batching.preference_batch(records, BUCKETS, PAD)
  shared = batching.shared_preference_batch(records, BUCKETS, PAD, packing)
  if left:
    unshared = left_padded(unshared, ("chosen_", "rejected_"))
    shared = left_padded(shared, ("",))
  return jax.tree.map(jnp.asarray, unshared), jax.tree.map(jnp.asarray, shared)


def dpo_loss(module, loss_type="sigmoid", ref=REF):
  cfg = PreferenceLossConfig(loss_type=loss_type, beta=0.5, sft_weight=0.3)

  def fn(params, batch):
    stats = preference.pair_stats(module, params, batch, chunk_size=4)
    (pc, pr), (nc, nr), (sc, sr) = (stats[k] for k in ("logps", "lengths", "logits_sum"))
    return preference_loss(cfg, pc, pr, nc, nr, *ref, sc, sr)
  return fn


def assert_trees_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **TOL), a, b)


def test_shared_group_layout_and_predecessors():
  rec = pair_records(1)[0]
  g = batching.shared_group(rec)
  p = int(np.argmax(rec["chosen_mask"]))
  lc, lr = len(rec["chosen_ids"]) - p, len(rec["rejected_ids"]) - p
  np.testing.assert_array_equal(g["ids"], np.r_[rec["chosen_ids"], rec["rejected_ids"][p:]])
  np.testing.assert_array_equal(g["branch"], [0] * p + [1] * lc + [2] * lr)
  np.testing.assert_array_equal(g["positions"], np.r_[np.arange(p + lc), p + np.arange(lr)])
  prev = np.asarray(predecessor_index(jnp.asarray(g["branch"])[None]))[0]
  expected = np.r_[0, np.arange(p + lc - 1), p - 1, p + lc + np.arange(lr - 1)]
  np.testing.assert_array_equal(prev, expected)


# Each of packing / left padding / scanned layers on and off, in four runs (pairwise cover).
@pytest.mark.parametrize("packing,left,scan", [(False, False, True), (True, True, True),
                                               (True, False, False), (False, True, False)],
                         ids=["rows-right-scan", "packed-left-scan", "packed-right-unrolled",
                              "rows-left-unrolled"])
def test_dpo_values_and_gradients_equal_unshared(packing, left, scan):
  module, params = tiny(scan_layers=scan, remat_policy="full" if scan else "none")
  unshared, shared = layouts(pair_records(empty_prompt_at=2), packing, left)
  if packing:
    assert shared["input_ids"].shape[0] < unshared["chosen_input_ids"].shape[0]
  grad_fn = jax.jit(jax.value_and_grad(dpo_loss(module), has_aux=True))
  (loss_u, m_u), g_u = grad_fn(params, unshared)
  (loss_s, m_s), g_s = grad_fn(params, shared)
  np.testing.assert_allclose(loss_s, loss_u, **TOL)
  assert_trees_close(m_s, m_u)
  assert_trees_close(g_s, g_u)


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "kto"])
def test_every_pairwise_loss_type_equal_unshared(loss_type):
  module, params = tiny()
  unshared, shared = layouts(pair_records(seed=1), packing=True)
  fn = jax.jit(dpo_loss(module, loss_type))
  (loss_u, m_u), (loss_s, m_s) = fn(params, unshared), fn(params, shared)
  np.testing.assert_allclose(loss_s, loss_u, **TOL)
  assert_trees_close(m_s, m_u)


# A sliding window (Mistral) counts positions, not slots, in a shared row.
@pytest.mark.parametrize("window", [None, 4], ids=["full_attention", "sliding_window"])
def test_reference_logps_equal_unshared(window):
  module, params = tiny(seed=3, sliding_window=window)
  unshared, shared = layouts(pair_records(seed=2), packing=True)
  assert_trees_close(preference.reference_logps(module, params, shared, 4),
                     preference.reference_logps(module, params, unshared, 4))


def test_lora_gradients_equal_unshared():
  module, params = tiny(lora_alpha=8.0)
  spec = lora.LoraSpec(rank=4, alpha=8.0)
  adapters = jax.tree.map(lambda x: x + 0.05, lora.init_adapters(params, spec,
                                                                 jax.random.PRNGKey(1)))
  unshared, shared = layouts(pair_records(seed=4), packing=True)
  loss = lambda a, batch: dpo_loss(module)(lora.combine(params, a), batch)[0]
  grad_fn = jax.jit(jax.value_and_grad(loss))
  (lu, gu), (ls, gs) = grad_fn(adapters, unshared), grad_fn(adapters, shared)
  np.testing.assert_allclose(ls, lu, **TOL)
  assert_trees_close(gs, gu)


def token_logprobs(module, params, batch):
  stats = preference.model_token_stats(module, params, preference.shared_rows(batch),
                                       targets_only=False)
  return np.asarray(stats["logprobs"])


def test_no_attention_leak_between_completions_or_groups():
  module, params = tiny(seed=6)
  _, shared = layouts(pair_records(seed=6), packing=True)
  assert np.asarray(shared["segment_ids"]).max() > 1  # several groups in a row
  before = token_logprobs(module, params, shared)
  branch, pair = np.asarray(shared["branch_ids"]), np.asarray(shared["pair_ids"])
  real = np.asarray(shared["attention_mask"]) > 0
  predicted = real & (np.asarray(shared["positions"]) > 0)  # a group's first token has no prefix
  # Rejected tokens of every pair; then every token of the groups other than pair 0's.
  for changed, watched in ((branch == 2, branch == 1), ((pair != 0) & real, pair == 0)):
    ids = np.where(changed, (np.asarray(shared["input_ids"]) + 7) % VOCAB, shared["input_ids"])
    after = token_logprobs(module, params, {**shared, "input_ids": jnp.asarray(ids)})
    np.testing.assert_array_equal(after[watched & predicted], before[watched & predicted])
    assert not np.allclose(after[changed], before[changed])  # the changed tokens do move


@pytest.mark.parametrize("packing", [False, True], ids=["rows", "packed"])
def test_reward_model_pair_scores_and_gradients_equal_unshared(packing):
  module, params = tiny(LlamaForScore, seed=7)
  unshared, shared = layouts(pair_records(seed=7), packing)
  loss = lambda p, batch: jnp.sum(jnp.stack(preference.pair_scores(module, p, batch)) ** 2)
  scores_u, scores_s = (preference.pair_scores(module, params, b) for b in (unshared, shared))
  assert_trees_close(scores_s, scores_u)
  assert_trees_close(jax.grad(loss)(params, shared), jax.grad(loss)(params, unshared))


def test_unshared_pairs_recover_the_records():
  records = pair_records(seed=8, empty_prompt_at=0)
  shared = batching.shared_preference_batch(records, BUCKETS, PAD, packing=True)
  for rec, sides in zip(records, batching.unshared_pairs(shared)):
    for side, (ids, loss_mask) in zip(("chosen", "rejected"), sides):
      np.testing.assert_array_equal(ids, rec[side + "_ids"])
      np.testing.assert_array_equal(loss_mask, rec[side + "_mask"])


def test_reference_cache_keys_do_not_depend_on_the_layout():
  from jaxpost.algos.ref_cache import pair_keys
  records = pair_records(seed=9)
  assert (pair_keys(batching.shared_preference_batch(records, BUCKETS, PAD, packing=True))
          == pair_keys(batching.preference_batch(records, BUCKETS, PAD)))


# ---------------------------------------------------------------- through the training loop

PAIRS = [{"prompt": f"Question {i}: is {i} a number, and is {i * 7} larger than {i + 3}?",
          "chosen": "yes" if i % 2 else "yes, it is", "rejected": "no" if i % 3 else "no, never"}
         for i in range(16)]
RUN = {"max_steps": 3, "log_every": 1, "batch_size": 8, "checkpoint.every": -1, "data.eval": "",
       "metrics.progress_bar": False, "metrics.tensorboard": False,
       "optimizer.warmup_steps": 0, "optimizer.learning_rate": 1e-2}


def run_metrics(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if "loss" in r]


def train_dpo(workdir, data, **overrides):
  config = dpo_config.get_config("tiny")
  config.update_from_flattened_dict({**RUN, "workdir": str(workdir), "data.train": data,
                                     **overrides})
  jaxpost.train(config)
  return run_metrics(workdir)


def assert_same_runs(a, b, keys=("loss", "rewards/margins", "logps/chosen", "logps/rejected")):
  assert len(a) == len(b) == RUN["max_steps"]
  for x, y in zip(a, b):
    for key in keys:
      assert x[key] == pytest.approx(y[key], rel=2e-5, abs=1e-6), key


def test_runs_equal_unshared_packed_precomputed_and_on_eight_devices(tmp_path):
  """DPO steps through the loop: unshared vs prefix-shared (packed, with the reference precomputed
  once) on one device vs prefix-shared on 8 fake devices (data=2, fsdp=2, tensor=2) in 2
  microbatches."""
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  flags = {**RUN, "workdir": tmp_path / "eight", "data.train": data, "data.prefix_sharing": True,
           "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "grad_accum": 2}
  eight = subprocess.Popen(
      [sys.executable, "scripts/train.py", "--config=configs/dpo.py:tiny",
       *(f"--config.{k}={v}" for k, v in flags.items())],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  unshared = train_dpo(tmp_path / "unshared", str(data), **{"data.prefix_sharing": False})
  packed = train_dpo(tmp_path / "packed", str(data), **{"data.prefix_sharing": True,
                                                       "data.packing": True,
                                                       "precompute_ref": True})
  _, err = eight.communicate(timeout=600)
  assert eight.returncode == 0, err[-3000:]
  assert "'data': 2, 'fsdp': 2, 'tensor': 2" in err
  assert unshared[-1]["rewards/margins"] != 0.0
  assert_same_runs(packed, unshared)
  assert_same_runs(run_metrics(tmp_path / "eight"), unshared)


@pytest.mark.slow
def test_bundled_dpo_loss_and_gradients_equal_unshared():
  """The bundled SmolLM2-135M on chat-templated pairs from the real loader (~57 s on 2 busy cores:
  loading, and two forward + backward compiles of a 135M model)."""
  from jaxpost.data.loader import build_loader
  lm = jaxpost.load_model("bundled:smollm2-135m-instruct", tokenizer=True)
  batches = {}
  for shared in (False, True):
    data = dpo_config.get_config().data
    data.train, data.prefix_sharing, data.packing, data.cache = PAIRS[:4], shared, shared, False
    batches[shared] = jax.tree.map(jnp.asarray, next(build_loader(data, lm.tokenizer,
                                                                  "preference", 4, seed=0)))
  ref = (jnp.asarray([-40.0, -30.0, -35.0, -20.0]), jnp.asarray([-25.0, -45.0, -30.0, -33.0]))
  grad_fn = jax.jit(jax.value_and_grad(dpo_loss(lm.model, ref=ref), has_aux=True))
  (loss_u, m_u), g_u = grad_fn(lm.params, batches[False])
  (loss_s, m_s), g_s = grad_fn(lm.params, batches[True])
  assert batches[True]["input_ids"].shape[0] < 4  # packed
  np.testing.assert_allclose(loss_s, loss_u, **TOL)
  assert_trees_close(m_s, m_u)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_u))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale),
               g_s, g_u)


def test_bad_combinations_fail_naming_the_keys(tmp_path):
  from jaxpost import configs
  from jaxpost.train.validate import ConfigError, check
  config = configs.get("dpo:tiny")
  config.workdir, config.data.prefix_sharing, config.data.packing = str(tmp_path), True, True
  check(config, num_devices=1)
  with pytest.raises(ConfigError, match="config.data.packing=True with data.prefix_sharing"):
    check(config, num_devices=2)
  config.grad_accum = 2
  with pytest.raises(ConfigError, match="config.grad_accum=2 with config.data.packing=True and"):
    check(config, num_devices=1)
  config.data.packing = False
  check(config, num_devices=2)  # one pair per row: microbatches and shards as unshared
  config.data.packing, config.algorithm, config.loss_type = True, "kto", "kto"
  with pytest.raises(ConfigError, match="config.data.packing is for SFT batches and"):
    check(config, num_devices=1)  # unpaired rows are not shared, so not packed
