"""Batched KV-cache sampling for Llama-family models.

For each row with prompt x (left-padded into a bucket of P slots) the engine
  1. prefills a preallocated cache with x in one forward and keeps the last logits z_0;
  2. for t = 0, 1, ... draws y_t ~ q(. | z_t), then feeds y_t (cache slot P + t, RoPE position
     len(x) + t) to get z_{t+1}, inside one jitted `lax.while_loop` that exits once every row
     has stopped (EOS / stop token) or `max_new_tokens` is reached.

The sampling distribution q applies, in HF's warper order,
  temperature  z / T                       (T = 0: greedy, y = argmax z)
  top-k        keep the k largest logits    (Fan et al. 2018, hierarchical story generation)
  top-p        keep the smallest most-likely set with mass >= p  (Holtzman et al. 2020, nucleus)
  min-p        keep y with q(y) >= min_p * max q  (Nguyen et al. 2024, "Turning Up the Heat")
Each token comes with `logprobs` = log softmax(z)[y] (the raw model distribution: the behaviour
log-prob PPO's ratio needs) and `sampling_logprobs` = log q(y) (0 under greedy).

Row r draws step t with key fold_in(fold_in(key(seed), r), t), so a row's samples do not depend on
the other rows, the bucket padding or the sharding. With `num_samples` = G the prefill runs once
per distinct prompt ([B] rows) and its caches and last logits are repeated to [B * G] rows (row
i * G + j is sample j of prompt i) before the first draw: the same rows as G copies of each
prompt, for 1/G of the prefill. Shapes are bucketed (batch, prompt length and
new-token budget to powers of two) so a run compiles a few times, not per call.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxpost._callable_module import make_callable
from jaxpost.generation_io import (
    GenerateResult, encode_prompts, eos_ids, find_stop_string, validate_sampling)
from jaxpost.models.llama import DecoderLayer, LlamaForCausalLM, build_mask
from jaxpost.train.sharding import batch_sharding, constrain_rows

MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 16
STOP_STRING_CHUNK = 16  # decode steps between host-side stop-string checks


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static (compile-time) structure of the sampler; the values live in `knobs`."""
  greedy: bool
  top_k: int
  top_p: bool
  min_p: bool

  @classmethod
  def make(cls, temperature, top_k, top_p, min_p):
    plan = cls(temperature == 0.0, int(top_k), top_p < 1.0, min_p > 0.0)
    knobs = jnp.asarray([temperature or 1.0, top_p, min_p], jnp.float32)
    return plan, knobs


def process_logits(logits, plan: Plan, knobs):
  """Logits of q: temperature, then top-k, top-p and min-p masks (-inf outside the kept set)."""
  x = logits / knobs[0]
  neg = jnp.finfo(x.dtype).min
  ranked = None
  if plan.top_k:
    ranked = jax.lax.top_k(x, plan.top_k)[0]  # descending
    x = jnp.where(x < ranked[:, -1:], -jnp.inf, x)
  if plan.top_p:
    ranked = ranked if ranked is not None else -jnp.sort(-x, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < knobs[1]  # mass strictly above < p
    cutoff = jnp.min(jnp.where(keep, ranked, -neg), axis=-1, keepdims=True)
    x = jnp.where(x < cutoff, -jnp.inf, x)
  if plan.min_p:
    probs = jax.nn.softmax(x, axis=-1)
    x = jnp.where(probs < knobs[2] * probs.max(-1, keepdims=True), -jnp.inf, x)
  return x


def sample_logits(logits, keys, plan: Plan, knobs):
  """One token per row: (ids [B], raw log-probs [B], sampling log-probs [B])."""
  raw = jax.nn.log_softmax(logits, axis=-1)
  if plan.greedy:
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    samp = jnp.zeros(tok.shape, jnp.float32)
  else:
    q = jax.nn.log_softmax(process_logits(logits, plan, knobs), axis=-1)
    tok = draw_tokens(keys, q)
    samp = jnp.take_along_axis(q, tok[:, None], axis=-1)[:, 0]
  return tok, jnp.take_along_axis(raw, tok[:, None], axis=-1)[:, 0], samp


SAMPLING_BLOCK = 256  # vocabulary entries per block of `draw_tokens`' first level


def draw_tokens(keys, logits):
  """One id per row y ~ softmax(logits) ([B, V], -inf = never) by inverse transform sampling,
  in two levels so fp32 cumulative sums stay short: a block of SAMPLING_BLOCK ids with
  probability its mass, then an id within it with probability its share; P(y) = p_y exactly.
  Two uniforms per row replace the V Gumbel draws of `jax.random.categorical` (5x faster on
  a 64 x 49152 CPU step)."""
  rows, vocab = logits.shape
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  weights = jnp.pad(weights, ((0, 0), (0, -vocab % SAMPLING_BLOCK))).reshape(rows, -1,
                                                                          SAMPLING_BLOCK)
  u = jax.vmap(lambda key: jax.random.uniform(key, (2,)))(keys)
  block = _inverse_cdf(weights.sum(-1), u[:, 0])
  within = _inverse_cdf(jnp.take_along_axis(weights, block[:, None, None], axis=1)[:, 0], u[:, 1])
  return block * SAMPLING_BLOCK + within


def _inverse_cdf(weights, u):
  """The index i with C_(i-1) <= u C_n < C_i of each row, C the cumulative sums of the
  non-negative `weights` [B, n] and u [B] in [0, 1): P(i) = w_i / sum(w); a zero weight is
  never drawn (u C_n is held below C_n, so some C_i exceeds it)."""
  cumulative = jnp.cumsum(weights, axis=-1)
  total = cumulative[:, -1:]
  point = jnp.minimum(u[:, None] * total, total * (1 - 2.0 ** -23))
  return jnp.sum(cumulative <= point, axis=-1).astype(jnp.int32)


def split_layers(params, cfg):
  """The per-layer parameter trees as a tuple, from stacked (scan) or unrolled params.

  Decoding runs the layers unrolled over separate weight buffers and per-layer caches: a scan
  over stacked weights makes XLA copy every layer's weight slice on every step (on CPU this
  doubled the step time), and a stacked cache is re-sliced and re-stacked each step.
  """
  if cfg.scan_layers:
    stacked = params["model"]["layers"]
    return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(cfg.num_hidden_layers))
  return tuple(params["model"][f"layers_{i}"] for i in range(cfg.num_hidden_layers))


def init_caches(cfg, batch: int, num_slots: int, dtype=None):
  """One zeroed {"k", "v": [batch, slots, kv_heads, head_dim]} cache per layer (a tuple)."""
  shape = (batch, num_slots, cfg.num_key_value_heads, cfg.head_dim)
  zeros = lambda: jnp.zeros(shape, dtype or cfg.dtype)
  return tuple({"k": zeros(), "v": zeros()} for _ in range(cfg.num_hidden_layers))


def forward_cached(model, params, layers, ids, positions, kv_mask, caches, index):
  """The decoder over `ids` [B, T], writing K/V at cache slots [index, index + T) (the model's
  `decode` contract, see llama.py); returns (fp32 logits of the last position [B, V], caches)."""
  cfg = model.cfg
  x = model.apply({"params": params}, ids, method=lambda m, i: m.model.embed_tokens(i))
  mask = build_mask(kv_mask, index, ids.shape[1], None, cfg.sliding_window)
  layer, new = DecoderLayer(cfg), []
  for layer_params, cache in zip(layers, caches):
    x, cache = layer.apply({"params": layer_params}, x, positions, mask, cache, index)
    new.append(cache)
  logits = model.apply({"params": params}, x[:, -1:], method=lambda m, h: m.logits(m.model.norm(h)))
  return logits[:, 0], tuple(new)


def _emit(state, logits, plan, knobs, stop_ids, pad_id):
  """Samples token `step` for every live row and records it; rows hitting a stop id finish."""
  i = state["step"]
  keys = jax.vmap(jax.random.fold_in, (0, None))(state["keys"], i)
  tok, raw, samp = sample_logits(logits, keys, plan, knobs)
  live = ~state["done"]
  hit = live & jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
  put = lambda buf, v, fill: buf.at[:, i].set(jnp.where(live, v, fill))
  return dict(state, step=i + 1, last=jnp.where(live, tok, pad_id),
              tokens=put(state["tokens"], tok, pad_id), logprobs=put(state["logprobs"], raw, 0.0),
              sampling_logprobs=put(state["sampling_logprobs"], samp, 0.0),
              lengths=state["lengths"] + live, done=state["done"] | hit,
              stopped=state["stopped"] | hit)


@functools.partial(jax.jit, static_argnames=("model", "plan", "num_new", "cache_dtype", "sharding",
                                             "num_samples"))
def start(model, params, layers, prompt_ids, prompt_mask, row_keys, live, knobs, stop_ids, pad_id,
          *, plan, num_new, cache_dtype=None, sharding=None, num_samples: int = 1):
  """Prefill of the [B, P] prompts + first token of each of the B * `num_samples` rows (`row_keys`,
  `live`: [B * num_samples]). Returns the decode state (a pytree of device arrays)."""
  b, p = prompt_ids.shape
  prompt_mask = prompt_mask.astype(jnp.int32)
  caches = jax.tree.map(lambda c: constrain_rows(c, sharding),
                        init_caches(model.cfg, b, p + num_new, cache_dtype))
  kv_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, num_new), jnp.int32)], axis=1)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
  logits, caches = forward_cached(model, params, layers, prompt_ids, positions, kv_mask, caches, 0)
  if num_samples > 1:  # broadcast each prompt's prefill to its samples
    repeat = lambda x: constrain_rows(jnp.repeat(x, num_samples, axis=0), sharding)
    logits, caches, kv_mask, prompt_mask = jax.tree.map(
        repeat, (logits, caches, kv_mask, prompt_mask))
    b *= num_samples
  state = dict(
      caches=caches, kv_mask=kv_mask, step=jnp.int32(0), last=jnp.zeros((b,), jnp.int32),
      pos=prompt_mask.sum(-1), keys=row_keys, done=~live, stopped=jnp.zeros((b,), bool),
      lengths=jnp.zeros((b,), jnp.int32), tokens=jnp.full((b, num_new), pad_id, jnp.int32),
      logprobs=jnp.zeros((b, num_new)), sampling_logprobs=jnp.zeros((b, num_new)))
  return _emit(state, logits, plan, knobs, stop_ids, pad_id)


@functools.partial(jax.jit, static_argnames=("model", "plan"), donate_argnames=("state",))
def run(model, params, layers, state, end, knobs, stop_ids, pad_id, *, plan):
  """Decodes until step == `end` (<= the state's token budget) or every row is done."""
  num_prompt_slots = state["kv_mask"].shape[1] - state["tokens"].shape[1]

  def body(s):
    slot = num_prompt_slots + s["step"] - 1
    kv_mask = jax.lax.dynamic_update_slice(
        s["kv_mask"], jnp.ones((s["last"].shape[0], 1), jnp.int32), (0, slot))
    logits, caches = forward_cached(model, params, layers, s["last"][:, None], s["pos"][:, None],
                                    kv_mask, s["caches"], slot)
    s = dict(s, caches=caches, kv_mask=kv_mask, pos=s["pos"] + 1)
    return _emit(s, logits, plan, knobs, stop_ids, pad_id)

  cond = lambda s: (s["step"] < end) & ~jnp.all(s["done"])
  return jax.lax.while_loop(cond, body, state)


_split_jit = jax.jit(split_layers, static_argnums=1)


def decode_layers(lm):
  """`split_layers` of `lm.params`, kept on `lm` and reused while its params hold the same
  arrays: the unstacked copy reads and writes every layer weight (a 135M model's 0.5 GB per
  `generate` call otherwise); new params (`lm.params = ...`) are split again."""
  leaves = jax.tree.leaves(lm.params)
  refs, layers = getattr(lm, "_decode_layers", ((), None))
  if len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves)):
    return layers
  layers = (_split_jit if lm.config.scan_layers else split_layers)(lm.params, lm.config)
  lm._decode_layers = (tuple(weakref.ref(x) for x in leaves), layers)
  return layers


def stop_array(stop_ids):
  """Stop ids padded with -1 to a multiple of 8 (fewer distinct shapes, fewer compiles)."""
  size = max(8, bucket(len(stop_ids), multiple=8))
  return jnp.asarray(list(stop_ids) + [-1] * (size - len(stop_ids)), jnp.int32)


def row_keys(rng, row_ids):
  return jax.vmap(jax.random.fold_in, (None, 0))(rng, row_ids)


def sample_tokens(model, params, prompt_ids, prompt_mask, rng, *, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0, stop_token_ids: Optional[Sequence[int]] = None,
                  pad_token_id: Optional[int] = None, row_ids=None, cache_dtype=None,
                  sharding: Optional[NamedSharding] = None, num_samples: int = 1):
  """Samples up to `max_new_tokens` per row from left-padded int arrays; jit-friendly.

  Sampling arguments, `max_new_tokens` and `num_samples` must be Python numbers (they fix the
  compiled structure); `prompt_ids`/`prompt_mask` [B, P], `rng` a PRNG key. `num_samples` = G
  draws G rows per prompt from one shared prefill: R = B * G rows, row i * G + j is sample j of
  prompt i. `row_ids` [R] (default arange(R)) pick each row's random stream. `stop_token_ids`
  default to the config's EOS ids.
  `sharding`: a NamedSharding whose spec[0] names the mesh axes the batch is split over
  (`jaxpost.train.sharding.batch_sharding`).
  Returns a dict: `tokens` [R, N] (pad after a row stops; the stop token is included),
  `mask` [R, N] (1 on generated tokens), `lengths` [R], `stopped` [R] (stop token vs length),
  `logprobs` and `sampling_logprobs` [R, N] (0 on padding).
  """
  cfg = model.cfg
  stop = tuple(eos_ids(cfg) if stop_token_ids is None else stop_token_ids)
  validate_sampling(cfg, max_new_tokens, temperature, top_k, top_p, min_p, stop, num_samples)
  plan, knobs = Plan.make(temperature, top_k, top_p, min_p)
  pad = default_pad_id(cfg) if pad_token_id is None else pad_token_id
  stop_arr = stop_array(stop)
  b = prompt_ids.shape[0] * num_samples
  keys = row_keys(rng, jnp.arange(b) if row_ids is None else row_ids)
  layers = split_layers(params, cfg)
  state = start(model, params, layers, prompt_ids, prompt_mask, keys, jnp.ones((b,), bool), knobs,
                stop_arr, pad, plan=plan, num_new=max_new_tokens, cache_dtype=cache_dtype,
                sharding=sharding, num_samples=num_samples)
  state = run(model, params, layers, state, max_new_tokens, knobs, stop_arr, pad, plan=plan)
  mask = jnp.arange(max_new_tokens)[None] < state["lengths"][:, None]
  return {k: state[k] for k in ("tokens", "lengths", "stopped", "logprobs", "sampling_logprobs")
          } | {"mask": mask.astype(jnp.int32)}


def default_pad_id(cfg) -> int:
  """The config's pad id, else its first EOS id, else 0."""
  if cfg.pad_token_id is not None:
    return int(cfg.pad_token_id)
  return (eos_ids(cfg) or (0,))[0]


def bucket(n: int, minimum: int = 1, multiple: int = 1) -> int:
  """Smallest power of two >= max(n, minimum), rounded up to a multiple of `multiple`."""
  size = 1 << (max(n, minimum) - 1).bit_length()
  return -(-size // multiple) * multiple


def generate(lm, prompts, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, n: int = 1,
             stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), seed: int = 0,
             chat_template: Any = None, ignore_eos: bool = False, batch_size: int = 64,
             mesh=None, batch_axes=("data",), cache_dtype=None) -> GenerateResult:
  """Generates `n` completions for each prompt; returns a `GenerateResult` (prompt-major rows).

  prompts: a list of chat message lists, strings or token-id lists (a lone string is one prompt).
    Strings are rendered as one user turn with the chat template when the tokenizer has one
    (`chat_template=None`); False keeps them raw, True forces the template, a string is a Jinja
    template to use instead of the tokenizer's.
  Rows stop at the config's EOS ids, `stop_token_ids` or `stop_strings` (text cut just before the
  stop string; tokens end with the token that completed it) or after `max_new_tokens`;
  `ignore_eos` leaves the EOS ids out of the stop set (benchmarks).
  batch_size: rows per compiled batch (buckets: powers of two). mesh/batch_axes: split the batch
    over these mesh axes; parameters are used with whatever sharding they have.
  """
  engine, encoded = _Engine.setup(
      lm, prompts, max_new_tokens, temperature, top_k, top_p, min_p, n, stop_token_ids,
      stop_strings, seed, chat_template, ignore_eos, mesh, batch_axes, cache_dtype)
  rows = sorted(range(len(encoded) * n), key=lambda r: -len(encoded[r // n]))
  out = [None] * len(rows)
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    for r, row in zip(chunk, engine.run([encoded[r // n] for r in chunk], chunk, max_new_tokens)):
      out[r] = row
  return GenerateResult.from_rows(out, encoded, n, lm.tokenizer)


def stream(lm, prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, min_p: float = 0.0, stop_token_ids: Sequence[int] = (),
           seed: int = 0, chat_template: Any = None):
  """Yields the new token ids of one prompt as they are sampled (a stop token included), one
  jitted decode step per token: for interactive use. Arguments as in `generate`."""
  engine, encoded = _Engine.setup(
      lm, [prompt], max_new_tokens, temperature, top_k, top_p, min_p, 1, stop_token_ids, (), seed,
      chat_template, False, None, (), None)
  state = engine.begin(encoded, [0], max_new_tokens)
  for step in range(1, max_new_tokens + 1):
    if step > 1:
      state = engine.advance(state, step)
    length, token, done = jax.device_get(
        (state["lengths"][0], state["tokens"][0, step - 1], state["done"][0]))
    if length < step:
      return
    yield int(token)
    if done:
      return


class _Engine:
  """Host side of a `generate` call: pads chunks of rows, runs the jitted loop, post-processes."""

  def __init__(self, lm, plan, knobs, stop, stop_strings, seed, mesh, batch_axes, cache_dtype):
    self.lm, self.plan, self.knobs, self.stop_strings = lm, plan, knobs, stop_strings
    self.stop_arr, self.pad = stop_array(stop), default_pad_id(lm.config)
    self.rng = jax.random.PRNGKey(seed)
    self.sharding = batch_sharding(mesh, batch_axes) if mesh is not None else None
    self.cache_dtype = cache_dtype
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    self.shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in axes]))
    self.layers = decode_layers(lm)

  @classmethod
  def setup(cls, lm, prompts, max_new_tokens, temperature, top_k, top_p, min_p, n, stop_token_ids,
            stop_strings, seed, chat_template, ignore_eos, mesh, batch_axes, cache_dtype):
    """Validates everything and encodes the prompts; returns (engine, prompt token lists)."""
    cfg, tok = lm.config, lm.tokenizer
    if not isinstance(lm.model, LlamaForCausalLM):
      raise ValueError("generation needs a causal LM (load_model(..., head='lm')).")
    stop = () if ignore_eos else eos_ids(cfg)
    stop = tuple(dict.fromkeys(stop + tuple(int(i) for i in stop_token_ids)))
    validate_sampling(cfg, max_new_tokens, temperature, top_k, top_p, min_p, stop, n,
                      stop_strings)
    if stop_strings and tok is None:
      raise ValueError("stop_strings need a tokenizer (lm.tokenizer is None).")
    encoded = encode_prompts(tok, prompts, chat_template, cfg, max_new_tokens)
    plan, knobs = Plan.make(temperature, top_k, top_p, min_p)
    return cls(lm, plan, knobs, stop, tuple(stop_strings), seed, mesh, batch_axes,
               cache_dtype), encoded

  def _put(self, x):
    return jnp.asarray(x) if self.sharding is None else jax.device_put(x, self.sharding)

  def begin(self, prompts, row_ids, max_new_tokens):
    """Left-pads `prompts` into a bucketed batch; prefill + first token; returns the state."""
    b = bucket(len(prompts), multiple=self.shards)
    p = bucket(max(len(x) for x in prompts), MIN_PROMPT_BUCKET)
    ids = np.full((b, p), self.pad, np.int32)
    mask = np.zeros((b, p), np.int32)
    for j, x in enumerate(prompts):
      ids[j, p - len(x):], mask[j, p - len(x):] = x, 1
    mask[len(prompts):, -1] = 1  # padding rows: one dummy token, done from the start
    rid = np.zeros(b, np.int32)
    rid[:len(row_ids)] = row_ids
    keys = row_keys(self.rng, jnp.asarray(rid))
    return start(self.lm.model, self.lm.params, self.layers, self._put(ids), self._put(mask),
                 self._put(keys), self._put(np.arange(b) < len(prompts)), self.knobs,
                 self.stop_arr, self.pad, plan=self.plan,
                 num_new=bucket(max_new_tokens, MIN_NEW_BUCKET), cache_dtype=self.cache_dtype,
                 sharding=self.sharding)

  def advance(self, state, end):
    return run(self.lm.model, self.lm.params, self.layers, state, end, self.knobs, self.stop_arr,
               self.pad, plan=self.plan)

  def run(self, prompts, row_ids, max_new_tokens):
    """Rows (tokens, logprobs, sampling_logprobs, finish, stop-string cut) for `prompts`."""
    state = self.begin(prompts, row_ids, max_new_tokens)
    chunk = STOP_STRING_CHUNK if self.stop_strings else max_new_tokens
    cuts = [None] * len(prompts)
    end = 0
    while end < max_new_tokens:
      end = min(end + chunk, max_new_tokens)
      state = self.advance(state, end)
      if self.stop_strings and self._check_strings(state, cuts):
        cut = np.zeros(state["done"].shape, bool)
        cut[:len(cuts)] = [c is not None for c in cuts]
        state["done"] = state["done"] | self._put(cut)
      if bool(jnp.all(state["done"])):
        break
    host = jax.device_get({k: state[k] for k in (
        "tokens", "lengths", "stopped", "logprobs", "sampling_logprobs")})
    return [self._row(host, j, cuts[j]) for j in range(len(prompts))]

  def _check_strings(self, state, cuts) -> bool:
    """Finds stop strings in rows not yet cut; True if any row was newly cut."""
    tokens, lengths, stopped = jax.device_get((state["tokens"], state["lengths"], state["stopped"]))
    found = False
    for j in range(len(cuts)):
      if cuts[j] is None:
        n = lengths[j] - int(stopped[j])
        cuts[j] = find_stop_string(self.lm.tokenizer, tokens[j, :n].tolist(), self.stop_strings)
        found |= cuts[j] is not None
    return found

  @staticmethod
  def _row(host, j, cut):
    n, stopped = int(host["lengths"][j]), bool(host["stopped"][j])
    text = None
    if cut is not None:
      n, stopped, text = cut[0], True, cut[1]
    return dict(tokens=host["tokens"][j, :n].tolist(), logprobs=host["logprobs"][j, :n],
                sampling_logprobs=host["sampling_logprobs"][j, :n], stopped=stopped, text=text,
                by_string=cut is not None)


make_callable(__name__, "generate")  # jaxpost.generate(lm, prompts)
