"""The jitted step: exact gradient accumulation; scan_updates' norms; the optimiser's schedule
and decay mask."""

import contextlib
import os
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxpost.configs import sft as sft_config  # noqa: E402

from jaxpost.losses import sft  # noqa: E402
from jaxpost.train import algorithms, optim  # noqa: E402
from jaxpost.train import sharding as sh  # noqa: E402
from jaxpost.train.state import create_train_state, load_sharded  # noqa: E402
from jaxpost.data.synthetic import SyntheticLoader  # noqa: E402
from jaxpost.train.step import gradient_step, scan_updates, update_and_param_norms  # noqa: E402


@contextlib.contextmanager
def _sft_update(grad_accum):
  """(state, gradient_step of sft, model, config, mesh) on the synthetic recipe, in its mesh."""
  c = sft_config.get_config("synthetic")
  c.grad_accum = grad_accum
  mesh, rules = sh.build_mesh(c.mesh), sh.rules_of(c.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    policy = load_sharded(c.model, mesh, rules)
    tx, schedule = optim.build_optimizer(c.optimizer, c.max_steps)
    state, state_sh = create_train_state(policy.params, tx, c.seed, mesh)
    ctx = algorithms.LossContext(policy.model, c)
    yield state, gradient_step(algorithms.get("sft"), ctx, tx, schedule, grad_accum, mesh,
                               state_sh.params), policy.model, c, mesh


def _run_steps(grad_accum, batch, num_steps=2):
  with _sft_update(grad_accum) as (state, update, model, c, _):
    step = jax.jit(update)
    init_params = jax.device_get(state.params)
    losses = []
    for _ in range(num_steps):
      state, metrics = step(state, {}, batch)
      losses.append(float(metrics["loss"]))
  return init_params, losses, jax.device_get(state.params), (model, c)


def test_grad_accumulation_4x2_equals_1x8():
  batch = next(SyntheticLoader(256, 8, 32, seed=5, min_length=4))  # unequal token counts
  params0, losses_1, params_1, (model, c) = _run_steps(1, batch)
  _, losses_4, params_4, _ = _run_steps(4, batch)
  np.testing.assert_allclose(losses_4, losses_1, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params_4, params_1)
  # The accumulated loss is the token-weighted loss of the whole batch, not a mean of means.
  ctx = algorithms.LossContext(model, c)
  full, _ = jax.jit(lambda p, b: sft.sft_loss(p, {}, b, None, ctx))(params0, batch)
  np.testing.assert_allclose(losses_4[0], float(full), rtol=1e-5)


def test_scan_updates_equals_its_steps_and_measures_the_last_updates_norms():
  batch = next(SyntheticLoader(256, 8, 32, seed=6, min_length=4))
  with _sft_update(1) as (state, update, _, _, mesh):
    scanned, metrics = jax.jit(lambda st: scan_updates(update, st, {}, batch, 3, 1, mesh))(state)
    stepped, losses = state, []
    for _ in range(3):
      before = stepped.params
      stepped, last = jax.jit(update)(stepped, {}, batch)
      losses.append(float(last["loss"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), scanned.params,
               stepped.params)
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
  moved = jax.tree.map(lambda a, b: a - b, stepped.params, before)
  for key, tree in (("param_norm", stepped.params), ("update_norm", moved)):
    np.testing.assert_allclose(float(metrics[key]), float(last[key]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics[key]), float(optax.tree.norm(tree)), rtol=1e-4)
  assert float(metrics["update_norm"]) > 0


def test_skipped_norms_are_zero_and_bfloat16_norms_come_back_in_float32():
  tree = {"w": jax.numpy.full((4, 3), 2.0, jax.numpy.bfloat16)}
  norms = jax.jit(lambda flag: update_and_param_norms(tree, tree, flag))
  for flag, expected in ((True, np.sqrt(48.0)), (False, 0.0)):
    out = norms(jax.numpy.asarray(flag))
    for value in out.values():
      assert value.dtype == np.float32
      np.testing.assert_allclose(float(value), expected, rtol=1e-3)


def _opt_cfg(**kw):
  base = dict(name="adamw", learning_rate=1.0, b1=0.9, b2=0.999, eps=1e-8, momentum=0.0,
              weight_decay=0.1, decay_embeddings=True, max_grad_norm=1.0, schedule="cosine",
              warmup_steps=10, warmup_ratio=0.0, min_lr_ratio=0.1)
  return ml_collections.ConfigDict({**base, **kw})


@pytest.mark.parametrize("kind,mid", [("cosine", 0.55), ("linear", 0.55), ("constant", 1.0)])
def test_schedule_warmup_then_decay(kind, mid):
  schedule = optim.learning_rate_schedule(_opt_cfg(schedule=kind), max_steps=110)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0])
  np.testing.assert_allclose(schedule(60), mid, rtol=1e-6)  # halfway through the decay
  np.testing.assert_allclose(schedule(110), 0.1 if kind != "constant" else 1.0, rtol=1e-6)


def test_decay_mask_skips_norms_biases_and_optionally_embeddings():
  params = {"model": {"embed_tokens": {"embedding": 0}, "norm": {"scale": 0},
                      "layers": {"q_proj": {"kernel": 0, "bias": 0}}}, "lm_head": {"kernel": 0}}
  mask = optim.decay_mask(params, decay_embeddings=True)
  assert mask["model"]["layers"]["q_proj"] == {"kernel": True, "bias": False}
  assert mask["model"]["norm"]["scale"] is False and mask["lm_head"]["kernel"] is True
  assert mask["model"]["embed_tokens"]["embedding"] is True
  assert optim.decay_mask(params, False)["model"]["embed_tokens"]["embedding"] is False


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd"])
def test_optimizers_clip_and_decay(name):
  params = {"w": {"kernel": np.ones((4, 4), np.float32)}, "n": {"scale": np.ones(4, np.float32)}}
  tx, _ = optim.build_optimizer(_opt_cfg(name=name, warmup_steps=0, learning_rate=0.1), 10)
  zero_grads = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert float(new["w"]["kernel"][0, 0]) < 1.0  # decayed with zero gradient
  np.testing.assert_array_equal(new["n"]["scale"], params["n"]["scale"])  # norms are not
