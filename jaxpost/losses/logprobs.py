"""Chunked token log-probabilities, computed only at the trainable target positions.

For hidden states h (the model's final normed hidden, [B, T, D]) and output kernel W ([D, V]),

    log p(x_t | x_<t) = z_{t-1}[x_t] - logsumexp(z_{t-1}),      z_t = h_t W / T   (fp32)

and out[:, 0] = 0 (the first token has no prefix). T is the `temperature` (1 by default; rollout
algorithms score their samples at the sampling temperature).

Chunks. The logits are computed B * chunk_size positions at a time (`chunk_size` positions per
row's worth, so a chunk's fp32 logits are [B * chunk_size, V]); the backward pass recomputes
each chunk's logits instead of storing them (a custom VJP whose residuals are only the inputs),
so one chunk of logits is alive at a time (the "levers" in DESIGN.md; as in Liger's fused linear cross-entropy,
Hsu et al. 2024).

Targets only. With a `mask` [B, T] (the batch's `loss_mask`) only positions with mask > 0 are
wanted. The LM head costs 2 D V FLOPs per position (about a fifth of a small model's step) and
in SFT/DPO most positions are prompt. So the rows are split into G groups of B / G consecutive
rows, each group's positions are flattened and its wanted ones moved to the front (a stable
argsort on mask == 0: a fixed-size permutation, shapes stay static), and chunks of
B * chunk_size positions (chunk_size * B / G per group) are computed in a loop whose trip count
is traced: with K_g wanted positions in group g, only ceil(max_g K_g / (chunk_size * B / G))
chunks run, forward and backward (the same loop structure in both, so it also works inside
`lax.scan`; it is reverse-mode only, no `jax.jvp`). G = 1 packs the wanted positions of the
whole batch most tightly; G = B sorts within rows only, which keeps every op row-local, so a
batch sharded over devices stays sharded (with G = 1 each device would compute the whole
batch's head). The default picks G = 1 on one device and G = B on several. The stats are put
back in place; positions with mask == 0 get 0 (and no gradient).

The same machinery serves any per-position function of the logits: `chunked_head(chunk_fn,
...)` runs `chunk_fn` chunk by chunk, with optional `context` (e.g. a frozen teacher's hidden
states, permuted and chunked with the student's) whose logits the function computes itself, so
vocabulary-wide terms such as a distillation KL (losses/distill.py) never hold more than one
chunk of either model's logits. `token_stats` is `chunked_head` of `_chunk_stats`.

Prefix-shared rows (`branch_ids`, models/llama.py): token t of a completion is predicted from
the previous slot of its own branch, or from the last prompt slot for a completion's first token
when another completion precedes it in the row (`predecessor_index`); the hidden states are
gathered at those slots instead of shifted by one.

`token_stats` also returns per-token diagnostics that TRL logs (argmax accuracy: the target's
logit is the row's maximum; entropy; mean logit) and the logsumexp; they carry no gradient,
except the entropy with `entropy_grad=True` (PPO's entropy bonus), whose gradient the same
recomputing backward pass carries. That backward reads each chunk's forward logsumexp (and
entropy), so it recomputes the logits' matmul only.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpost.models.llama import output_kernel

DEFAULT_CHUNK_SIZE = 32
STATS = ("logprobs", "correct", "entropy", "logit_mean", "lse")
FORWARD = "forward"  # context key of a chunk's forward stats, in the backward's recompute


def chunk_logits(h, kernel, temperature=1.0):
  """fp32 logits h W / temperature of one chunk: h [G, C, D], kernel [D, V] -> [G, C, V]."""
  logits = jnp.dot(h.reshape(-1, h.shape[-1]), kernel.astype(h.dtype),  # 2-D: see lora.dense
                   preferred_element_type=jnp.float32)
  return logits.reshape(*h.shape[:-1], -1) / temperature


def _chunk_stats(h, kernel, targets, context, consts, entropy_grad: bool = False):
  """Stats of one chunk: h [G, C, D], targets [G, C] -> dict of [G, C] fp32 arrays of the
  distribution p = softmax(z), z = h W / consts["temperature"]: `logprobs`, `correct`, `entropy`
  H = logsumexp(z) − Σ_v p_v z_v (differentiable with `entropy_grad`, else a diagnostic
  without gradient), `logit_mean` and `lse` = logsumexp(z).

  Each vocabulary-wide pass is written the way XLA:CPU runs fastest: the row maximum is
  computed once (for logsumexp and for `correct`, the target's logit reaching it) and Σ_v p_v z_v
  is a batched dot product (fused as an elementwise reduction it runs an order of magnitude
  slower). In the backward's recompute (`context[FORWARD]`: this chunk's forward stats) see
  `_recomputed_stats`."""
  logits = chunk_logits(h, kernel, consts["temperature"])
  if FORWARD in context:
    return _recomputed_stats(logits, targets, context[FORWARD], entropy_grad)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  logits_ng = jax.lax.stop_gradient(logits)
  z, lse_z = (logits, lse) if entropy_grad else (logits_ng, jax.lax.stop_gradient(lse))
  probs = jnp.exp(z - lse_z[..., None])
  return {
      "logprobs": target_logit - lse,
      "correct": (jax.lax.stop_gradient(target_logit) >= top).astype(jnp.float32),
      "entropy": lse_z - jnp.einsum("gcv,gcv->gc", probs, z),
      "logit_mean": jnp.mean(logits_ng, axis=-1),
      "lse": lse,
  }


def _recomputed_stats(logits, targets, forward: dict, entropy_grad: bool) -> dict:
  """`_chunk_stats` in the backward's recompute, from the chunk's forward stats: the same values
  and the same gradients with respect to the logits z, with no vocabulary-wide reduction (the
  backward needs none once logsumexp is known; XLA:CPU fuses a reduction into the recomputed
  logits' matmul at ~8x its cost). With p = exp(z − lse) from the saved lse:
  ∂ logprob / ∂z = onehot(target) − p, and ∂H / ∂z = −p (z − (lse − H)). Each enters as
  `linear(g)` = Σ_v g_v (z_v − sg(z_v)): value 0, gradient g."""
  z_ng = jax.lax.stop_gradient(logits)
  lse = forward["lse"]
  probs = jnp.exp(z_ng - lse[..., None])
  linear = lambda g: jnp.sum(g * (logits - z_ng), axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  lse_z = lse + linear(probs)  # the value lse, the gradient p
  entropy = forward["entropy"]
  if entropy_grad:
    entropy = entropy + linear(-probs * (z_ng - (lse - entropy)[..., None]))
  return {"logprobs": target_logit - lse_z, "correct": forward["correct"], "entropy": entropy,
          "logit_mean": forward["logit_mean"], "lse": lse_z}


_chunk_stats_entropy_grad = functools.partial(_chunk_stats, entropy_grad=True)


def _at(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _live_chunks(chunk_fn, h, kernel, ids, context, consts, num_live):
  """`chunk_fn` of chunks i < num_live of h [N, G, C, D] / ids [N, G, C] / context [N, G, C, ...]
  -> dict of [N, G, C] stats, zeros for the rest: a loop with a traced trip count, so skipped
  chunks cost nothing."""
  shapes = jax.eval_shape(chunk_fn, h[0], kernel, ids[0], _at(context, 0), consts)

  def body(i, out):
    stats = chunk_fn(h[i], kernel, ids[i], _at(context, i), consts)
    return {k: out[k].at[i].set(stats[k]) for k in out}
  init = {k: jnp.zeros(ids.shape, s.dtype) for k, s in shapes.items()}
  return jax.lax.fori_loop(0, num_live, body, init)


def _live_chunks_fwd(chunk_fn, h, kernel, ids, context, consts, num_live):
  out = _live_chunks(chunk_fn, h, kernel, ids, context, consts, num_live)
  return out, (h, kernel, ids, context, consts, num_live, out)


def _live_chunks_bwd(chunk_fn, res, cotangents):
  """Recomputes each live chunk's logits and pulls back the stats' cotangents to h and the
  kernel (stats built from stop-gradient values pull back nothing); the kernel gradient is summed
  over chunks in fp32. The chunk's forward stats reach `chunk_fn` as context[FORWARD] (so it
  may reuse, e.g., its logsumexp). `context` and `consts` (another model's hidden states, its
  kernel, the temperature) get no gradient: they are frozen inputs."""
  h, kernel, ids, context, consts, num_live, out = res

  def body(i, grads):
    d_h, d_kernel = grads
    recompute = {**_at(context, i), FORWARD: _at(out, i)}
    stats = lambda x, w: chunk_fn(x, w, ids[i], recompute, consts)
    d_hi, d_ki = jax.vjp(stats, h[i], kernel)[1](_at(cotangents, i))
    return d_h.at[i].set(d_hi), d_kernel + d_ki.astype(jnp.float32)

  init = (jnp.zeros_like(h), jnp.zeros(kernel.shape, jnp.float32))
  d_h, d_kernel = jax.lax.fori_loop(0, num_live, body, init)
  return d_h, d_kernel.astype(kernel.dtype), None, None, None, None


_live_chunks.defvjp(_live_chunks_fwd, _live_chunks_bwd)


def predecessor_index(branch_ids):
  """[B, T] int32: the slot whose hidden state predicts token t of a prefix-shared row.

  t - 1, except at the first token of a completion that follows another completion (branch of
  t - 1 neither 0 nor t's), where it is the last prompt (branch 0) slot before t."""
  t = branch_ids.shape[1]
  slots = jnp.arange(t)
  last_prompt = jax.lax.cummax(jnp.where(branch_ids == 0, slots, 0), axis=1)
  before = jnp.concatenate([jnp.zeros_like(branch_ids[:, :1]), branch_ids[:, :-1]], axis=1)
  continues = (branch_ids == 0) | (before == 0) | (before == branch_ids)
  return jnp.where(continues, jnp.maximum(slots - 1, 0), last_prompt).astype(jnp.int32)


def chunked_head(chunk_fn: Callable, hidden, kernel, input_ids,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, mask=None, groups: Optional[int] = None,
                 context: Optional[dict] = None, consts: Optional[dict] = None,
                 branch_ids=None) -> dict:
  """`chunk_fn(h, kernel, ids, context, consts) -> {name: [G, C] fp32}` at every wanted position
  t >= 1 of the batch, chunk by chunk (module docstring), as {name: [B, T]} with 0 elsewhere.

  Position t gets h = hidden[:, t - 1] (the state predicting token t), ids = input_ids[:, t] and
  context[k][:, t - 1] for each entry [B, T, ...] of `context` (e.g. a frozen teacher's hidden
  states, read at the same predicting position); `consts` (a dict of arrays: a teacher's
  kernel, a temperature) is passed whole. Gradients flow to `hidden` and `kernel` only, through
  a backward pass that recomputes each chunk. `chunk_size`, `mask`, `groups`, `branch_ids`: see
  `token_stats`."""
  b, t, _ = hidden.shape
  if input_ids.shape != (b, t):
    raise ValueError(f"input_ids shape {input_ids.shape} does not match hidden {hidden.shape}")
  if mask is not None and mask.shape != (b, t):
    raise ValueError(f"mask shape {mask.shape} does not match input_ids {input_ids.shape}")
  groups = (1 if jax.device_count() == 1 else b) if groups is None else groups
  if groups < 1 or b % groups:
    raise ValueError(f"groups={groups} does not divide the batch's {b} rows")
  wanted = jnp.broadcast_to(jnp.arange(t) > 0, (b, t))
  if mask is not None:
    wanted = wanted & (mask > 0)
  # Position t is predicted from hidden t-1: shift right by one (zeros at t=0); prefix-shared
  # rows gather at each token's predecessor slot instead (t=0 is never wanted).
  if branch_ids is None:
    shift = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
  else:
    source = predecessor_index(branch_ids)
    shift = lambda x: jnp.take_along_axis(
        x, source.reshape(source.shape + (1,) * (x.ndim - 2)), axis=1)
  grouped = lambda x: x.reshape(groups, -1, *x.shape[2:])  # [G, (B / G) * T, ...]
  context = {k: grouped(shift(v)) for k, v in (context or {}).items()}
  out = _compacted(chunk_fn, grouped(shift(hidden)), kernel, grouped(input_ids), context,
                   consts or {}, grouped(wanted), max(1, min(chunk_size, t)) * (b // groups))
  return {k: v.reshape(b, t) * wanted for k, v in out.items()}


def token_stats(hidden, kernel, input_ids, chunk_size: int = DEFAULT_CHUNK_SIZE, mask=None,
                groups: Optional[int] = None, temperature: float = 1.0,
                entropy_grad: bool = False, branch_ids=None) -> dict:
  """Per-token stats [B, T] (fp32): `logprobs` (differentiable), `correct`, `entropy`
  (differentiable with `entropy_grad`: an entropy bonus), `logit_mean` — all describing the
  prediction of input_ids[:, t] from hidden[:, t-1]; 0 at t=0.

  `chunk_size`: positions per row in one chunk, i.e. B * chunk_size tokens' logits alive at once.
  `mask` [B, T] (optional): stats only where mask > 0, 0 elsewhere; the LM head runs only on the
  chunks needed for them. `groups` (dividing B): the wanted positions are packed within that many
  groups of consecutive rows; None picks 1 on one device, B on several (module docstring).
  `temperature` T > 0: the stats are those of softmax(logits / T). `branch_ids` [B, T]: the rows
  are prefix-shared (module docstring).
  """
  chunk_fn = _chunk_stats_entropy_grad if entropy_grad else _chunk_stats
  return chunked_head(chunk_fn, hidden, kernel, input_ids, chunk_size, mask, groups,
                      consts={"temperature": jnp.asarray(temperature, jnp.float32)},
                      branch_ids=branch_ids)


def _compacted(chunk_fn, h, kernel, ids, context, consts, wanted, chunk: int) -> dict:
  """`chunk_fn` of the wanted positions of each group (row) of h [G, N, D], ids / wanted [G, N],
  context [G, N, ...], chunk by chunk of [G, chunk] positions with the wanted ones moved first;
  [G, N] out."""
  g, n = wanted.shape
  num_chunks = -(-n // chunk)
  # Each group's wanted positions first (stable: in order), padded to whole chunks with index 0.
  order = jnp.pad(jnp.argsort(~wanted, axis=1, stable=True), ((0, 0), (0, num_chunks * chunk - n)))
  num_live = -(-jnp.max(jnp.sum(wanted, axis=1)) // chunk)  # chunks holding a wanted position
  gather = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)),
                                         axis=1)
  split = lambda x: gather(x).reshape(g, num_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)
  out = _live_chunks(chunk_fn, split(h), kernel, split(ids), jax.tree.map(split, context), consts,
                     num_live)
  inverse = jnp.argsort(order[:, :n], axis=1)
  unsort = lambda v: jnp.take_along_axis(v.swapaxes(0, 1).reshape(g, -1), inverse, axis=1)
  return {k: unsort(v) for k, v in out.items()}


def token_logprobs(hidden, kernel, input_ids, chunk_size: int = DEFAULT_CHUNK_SIZE, mask=None,
                   temperature: float = 1.0):
  """[B, T] fp32 with out[:, t] = log p(input_ids[:, t] | input_ids[:, :t]) at `temperature`;
  out[:, 0] = 0 (and 0 where `mask` == 0 when a mask is given)."""
  return token_stats(hidden, kernel, input_ids, chunk_size, mask,
                     temperature=temperature)["logprobs"]


def sequence_logprobs(token_lp, loss_mask, average: bool = False):
  """Sum over trainable tokens, [B]; `average` divides by their count (0 for empty rows)."""
  mask = loss_mask.astype(jnp.float32)
  total = jnp.sum(token_lp * mask, axis=-1)
  if not average:
    return total
  return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def model_token_stats(model, params, batch: dict, prefix: str = "",
                      chunk_size: int = DEFAULT_CHUNK_SIZE,
                      embed_hook: Optional[Callable] = None, dropout_rng=None,
                      targets_only: bool = True, temperature: float = 1.0,
                      return_hidden: bool = False, entropy_grad: bool = False) -> dict:
  """`token_stats` of a causal LM on the batch fields `{prefix}input_ids`, `..attention_mask`,
  `..positions`, `..segment_ids` (and `..branch_ids` for prefix-shared rows). With `targets_only` and a `{prefix}loss_mask` field, stats are
  computed only at its trainable targets (0 elsewhere); `targets_only=False` (or no loss_mask)
  computes every position. `embed_hook(embeddings) -> embeddings` rewrites the token
  embeddings (e.g. NEFTune noise) through a Flax method interceptor, so the model needs no flag.
  `dropout_rng` (training only) drives LoRA adapter dropout. `temperature`, `entropy_grad`: see
  `token_stats`.
  `return_hidden` adds the final hidden states [B, T, D] as "hidden" (a value head on the same
  forward: PPO's shared-backbone critic)."""
  hidden = model_hidden_states(model, params, batch, prefix, embed_hook, dropout_rng)
  mask = batch.get(prefix + "loss_mask") if targets_only else None
  stats = token_stats(hidden, output_kernel(params, model.cfg), batch[prefix + "input_ids"],
                      chunk_size, mask, temperature=temperature, entropy_grad=entropy_grad,
                      branch_ids=batch.get(prefix + "branch_ids"))
  return {**stats, "hidden": hidden} if return_hidden else stats


def model_hidden_states(model, params, batch: dict, prefix: str = "",
                        embed_hook: Optional[Callable] = None, dropout_rng=None):
  """The final normed hidden states [B, T, D] of a causal LM on the batch fields
  `{prefix}input_ids`, `..attention_mask`, `..positions`, `..segment_ids`, `..branch_ids`
  (`embed_hook`, `dropout_rng`: see `model_token_stats`)."""
  args = (batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
          batch.get(prefix + "positions"), batch.get(prefix + "segment_ids"),
          batch.get(prefix + "branch_ids"))
  with _intercept_embeddings(embed_hook):
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return model.apply({"params": params}, *args, method="hidden_states", rngs=rngs)


@contextlib.contextmanager
def _intercept_embeddings(hook):
  """Applies `hook` to the output of every `nn.Embed.__call__` (not `attend`) in the context."""
  if hook is None:
    yield
    return

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
      return hook(out)
    return out

  with nn.intercept_methods(interceptor):
    yield
