"""SFT loss: the formula on a tiny model, NEFTune noise, and memorisation through the loop."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxpost.configs import sft as sft_config  # noqa: E402

import jaxpost  # noqa: E402
from jaxpost.losses import sft  # noqa: E402
from jaxpost.models.config import LlamaConfig  # noqa: E402
from jaxpost.models.llama import LlamaForCausalLM, init_params  # noqa: E402
from jaxpost.train.algorithms import LossContext  # noqa: E402
from jaxpost.data.synthetic import SyntheticLoader  # noqa: E402


def _model():
  cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  model = LlamaForCausalLM(cfg)
  return model, init_params(model, jax.random.PRNGKey(0))


def _ctx(model, alpha=0.0, training=True):
  config = ml_collections.ConfigDict({"neftune_alpha": alpha, "logprob_chunk_size": 5})
  return LossContext(model, config, training)


def test_sft_loss_is_mean_nll_over_trainable_tokens():
  model, params = _model()
  batch = next(SyntheticLoader(64, 3, 12, seed=1, min_length=4))
  loss, metrics = sft.sft_loss(params, {}, batch, None, _ctx(model))
  logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
  logp = jax.nn.log_softmax(logits, -1)
  mask = batch["loss_mask"]
  nll = [-logp[b, t - 1, batch["input_ids"][b, t]] for b, t in zip(*np.nonzero(mask))]
  np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-5)
  assert float(sft.num_targets(batch)) == mask.sum()
  assert 0.0 <= float(metrics["mean_token_accuracy"]) <= 1.0


def test_neftune_noise_is_bounded_uniform_and_train_only():
  emb = jnp.zeros((2, 8, 16))
  noisy = sft.neftune_hook(jax.random.PRNGKey(0), alpha=5.0)(emb)
  bound = 5.0 / np.sqrt(8 * 16)
  assert float(jnp.abs(noisy).max()) <= bound
  assert float(jnp.abs(noisy).max()) > 0.9 * bound  # spans the interval
  np.testing.assert_allclose(float(jnp.mean(noisy ** 2)), bound ** 2 / 3, rtol=0.1)

  model, params = _model()
  batch = next(SyntheticLoader(64, 2, 12, seed=2))
  rng = jax.random.PRNGKey(3)
  clean, _ = sft.sft_loss(params, {}, batch, rng, _ctx(model))
  noisy_eval, _ = sft.sft_loss(params, {}, batch, rng, _ctx(model, 5.0, training=False))
  noisy_train, _ = sft.sft_loss(params, {}, batch, rng, _ctx(model, 5.0))
  assert float(clean) == float(noisy_eval)
  assert abs(float(clean) - float(noisy_train)) > 1e-6


def test_sft_memorises_a_few_sequences(tmp_path):
  c = sft_config.get_config("synthetic")
  c.workdir = str(tmp_path)
  c.data.train = "synthetic:rows=4"
  c.data.eval = ""
  c.batch_size = 4
  c.max_steps = 80
  c.log_every = 10
  c.checkpoint.every = -1
  c.metrics.progress_bar = False
  c.optimizer.learning_rate = 3e-3
  c.optimizer.schedule = "constant"
  metrics = jaxpost.train(c)
  first = json.loads(open(tmp_path / "metrics.jsonl").readline())["loss"]
  assert first > 4.0, first
  assert metrics["loss"] < 0.2, metrics
  assert metrics["mean_token_accuracy"] > 0.95, metrics


def test_packed_segment_starts_are_never_targets():
  batch = {"loss_mask": np.array([[0, 1, 1, 1, 1, 0]]),
           "segment_ids": np.array([[1, 1, 1, 2, 2, 0]])}
  np.testing.assert_array_equal(sft.target_mask(batch), [[0, 1, 1, 0, 1, 0]])
  assert float(sft.num_targets(batch)) == 3
