"""The train and eval steps, shared by every algorithm.

`gradient_step` is one optimiser update; `train_step` jits it (state donated) as the default
loop step; `scan_updates` runs it over epochs x minibatches of one batch (a rollout) as a
`lax.scan`, the update loop of PPO / GRPO / RLOO.

A global batch of B rows is split into A = `grad_accum` microbatches (row j goes to microbatch
j mod A, so every device holds rows of every microbatch) and reduced by a `lax.scan`:

    g = sum_i (w_i / W) grad loss_i,    loss = sum_i (w_i / W) loss_i,    W = sum_i w_i

with w_i = `algorithm.weight_fn(microbatch_i)`. When loss_i is a mean over w_i units this equals
the gradient of the loss of the whole batch, so 4 x 2 accumulation matches 1 x 8 exactly (up to
float reordering). The optimiser then applies one update. The step never syncs with the host:
it returns device scalars, including `update_norm` = ||new params - params||, `param_norm` =
||new params|| and `finite` (loss, gradient, update and parameter norms are all finite), which
the loop checks at every log boundary and before every checkpoint. Inside `scan_updates` the
update and parameter norms are those of the last update only (each is a full pass over the
parameters: ~0.3 s an update for PPO's two 135M members on a 2-core CPU); a non-finite update
earlier on still shows, through the parameters it leaves. With LoRA, `state.params` are the
adapters and the loss applies `frozen["lora_base"]` + adapters; gradients (and so the optimiser)
exist for the adapters only. Only `step`, `params`, `opt_state` and `rng` of the state change;
`extra` passes through (an algorithm's own step updates it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpost.train.algorithms import applied_params, is_members
from jaxpost.train.sharding import BATCH_AXES, replicated
from jaxpost.train.state import TrainState


def split_microbatches(batch: dict, num: int, mesh) -> dict:
  """[B, ...] -> [num, B / num, ...], microbatch i = rows i, i + num, i + 2 num, ..."""
  sharding = NamedSharding(mesh, P(None, BATCH_AXES))

  def split(x):
    rows = x.shape[0]
    if rows % num:
      raise ValueError(f"batch of {rows} rows is not divisible by grad_accum={num}")
    x = x.reshape((rows // num, num) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, sharding)

  return jax.tree.map(split, batch)


def num_tokens(batch: dict) -> jax.Array:
  """Real (non-pad) tokens in the batch, over every `*attention_mask` field."""
  masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
  return sum(jnp.sum(m.astype(jnp.float32)) for m in masks) if masks else jnp.float32(0)


def _weighted_sum(fn, micro, weights):
  """sum_i (w_i / W) fn(microbatch_i, i) as a scan; W = sum_i w_i (1 when all are 0).
  With one microbatch this is fn(microbatch_0, 0): losses are means over their own weight, so
  a microbatch of weight 0 has loss 0 either way. Sums are carried in at least float32 and cast
  back to fn's dtypes (bfloat16 gradients of bfloat16 parameters)."""
  first = jax.tree.map(lambda x: x[0], micro)
  if weights.shape[0] == 1:  # no accumulation buffer needed (the one scale is w / w = 1)
    return fn(first, 0)
  total = jnp.sum(weights)
  total = jnp.where(total > 0, total, 1.0)
  shapes = jax.eval_shape(fn, first, 0)
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)),
                      shapes)

  def body(carry, xs):
    mb, w, i = xs
    scale = w / total
    return jax.tree.map(lambda acc, x: acc + scale * x, carry, fn(mb, i)), None

  steps = jnp.arange(weights.shape[0])
  sums = jax.lax.scan(body, init, (micro, weights, steps))[0]
  return jax.tree.map(lambda x, s: x.astype(s.dtype), sums, shapes)


def _loss_with_metrics(algorithm, ctx):
  def loss(params, frozen, batch, rng):
    value, metrics = algorithm.loss_fn(applied_params(params, frozen), frozen, batch, rng, ctx)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return value, {**metrics, "loss": value}
  return loss


def gradient_step(algorithm, ctx, tx, schedule, grad_accum: int, mesh, param_shardings):
  """step(state, frozen, batch) -> (state, metrics): ONE optimiser update on `batch` (split
  into `grad_accum` microbatches), not jitted; `train_step` jits it for the loop and rollout
  algorithms run it inside `scan_updates`."""
  loss = _loss_with_metrics(algorithm, ctx)
  grad_fn = jax.grad(loss, has_aux=True)

  def step(state: TrainState, frozen, batch, measure_norms=True):
    rng, step_rng = jax.random.split(state.rng)
    micro = split_microbatches(batch, grad_accum, mesh)
    weights = jax.vmap(algorithm.weight_fn)(micro)

    def micro_grads(mb, i):
      grads, metrics = grad_fn(state.params, frozen, mb, jax.random.fold_in(step_rng, i))
      return jax.lax.with_sharding_constraint(grads, param_shardings), metrics

    grads, metrics = _weighted_sum(micro_grads, micro, weights)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    norms = {"grad_norm": optax.tree.norm(grads),
             **update_and_param_norms(updates, params, measure_norms)}
    if is_members(grads):  # several trainable members (PPO policy + critic): each one's norm
      norms.update({f"grad_norm/{name}": optax.tree.norm(g) for name, g in grads.items()})
    finite = jnp.isfinite(metrics["loss"])
    for norm in norms.values():
      finite &= jnp.isfinite(norm)
    metrics.update(
        norms, learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
        tokens=num_tokens(batch), finite=finite.astype(jnp.float32))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         rng=rng), metrics

  return step


def update_and_param_norms(updates, params, measure_norms=True) -> dict:
  """{"update_norm": ||updates||, "param_norm": ||params||} in float32; where `measure_norms` is
  a traced False (all but the last of `scan_updates`' updates) both are 0 and neither pass over
  the parameters runs (a `lax.cond`)."""
  def norms(u, p):
    return tuple(optax.tree.norm(t).astype(jnp.float32) for t in (u, p))

  if isinstance(measure_norms, bool):
    pair = norms(updates, params) if measure_norms else (jnp.float32(0), jnp.float32(0))
  else:
    pair = jax.lax.cond(measure_norms, norms, lambda u, p: (jnp.float32(0), jnp.float32(0)),
                        updates, params)
  return dict(zip(("update_norm", "param_norm"), pair))


def scan_updates(update, state: TrainState, frozen, batch: dict, num_epochs: int,
                 num_minibatches: int, mesh, rng=None):
  """`num_epochs` passes of `update` (a `gradient_step`) over `batch` split into
  `num_minibatches` minibatches: num_epochs x num_minibatches optimiser updates as ONE
  `lax.scan` (PPO's "epochs x minibatches", GRPO's num_iterations).

  With num_minibatches > 1 every epoch draws a fresh permutation of the rows from `rng`
  (minibatch k of epoch e = rows perm_e[k::M], so no row is left out); with one minibatch the
  rows keep their order. Returns (state, metrics): each metric averaged over the updates, except
  `finite` (the minimum: one bad update marks the iteration) and `learning_rate`, `update_norm`
  and `param_norm` (the last update's: only it measures them)."""
  rows = next(iter(batch.values())).shape[0]
  if rows % num_minibatches:
    raise ValueError(f"a batch of {rows} rows does not split into {num_minibatches} minibatches")
  if num_minibatches > 1:
    keys = jax.random.split(rng, num_epochs)
    order = jax.vmap(lambda k: jax.random.permutation(k, rows))(keys)      # [E, R]
  else:
    order = jnp.broadcast_to(jnp.arange(rows), (num_epochs, rows))
  # [E * M, R / M] row indices, update u = e * M + k taking rows order[e, k::M]
  order = order.reshape(num_epochs, rows // num_minibatches, num_minibatches)
  order = order.swapaxes(1, 2).reshape(num_epochs * num_minibatches, rows // num_minibatches)
  batch_rows = NamedSharding(mesh, P(BATCH_AXES))

  num_updates = order.shape[0]

  def body(state, xs):
    index, u = xs
    minibatch = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(jnp.take(x, index, axis=0), batch_rows)
        if num_minibatches > 1 else x, batch)
    return update(state, frozen, minibatch, measure_norms=u == num_updates - 1)

  state, history = jax.lax.scan(body, state, (order, jnp.arange(num_updates)))
  metrics = {k: jnp.mean(v) for k, v in history.items()}
  metrics["finite"] = jnp.min(history["finite"])
  for key in ("learning_rate", "update_norm", "param_norm"):
    metrics[key] = history[key][-1]
  return state, metrics


def train_step(setup):
  """The default `Algorithm.make_step`: `gradient_step` jitted with the state donated and
  explicit in/out shardings."""
  update = gradient_step(setup.algorithm, setup.ctx, setup.tx, setup.schedule,
                         setup.config.grad_accum, setup.mesh, setup.state_shardings.params)
  return jax.jit(update, in_shardings=(setup.state_shardings, setup.frozen_shardings,
                                       setup.batch_sharding),
                 out_shardings=(setup.state_shardings, replicated(setup.mesh)),
                 donate_argnums=(0,))


def make_eval_step(algorithm, ctx, grad_accum: int, mesh):
  """eval_step(params, frozen, batch) -> (metrics averaged by weight, total weight)."""
  loss = _loss_with_metrics(algorithm, ctx)
  rng = jax.random.PRNGKey(0)

  def eval_step(params, frozen, batch):
    micro = split_microbatches(batch, grad_accum, mesh)
    weights = jax.vmap(algorithm.weight_fn)(micro)
    metrics = _weighted_sum(lambda mb, i: loss(params, frozen, mb, rng)[1], micro, weights)
    return metrics, jnp.sum(weights)

  return eval_step
