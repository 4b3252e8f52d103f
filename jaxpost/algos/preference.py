"""The DPO family, KTO and the Bradley–Terry reward model as algorithms of the one training loop.

The math is in `jaxpost/losses/dpo.py` and `jaxpost/losses/reward.py`; this file turns batches
into the per-sequence inputs of those losses:

* Pairs (`chosen_*` / `rejected_*` fields, DESIGN "Batches") go through the model in ONE forward
  of 2B rows (chosen rows first), then split; each side gives summed completion log-probs, its
  completion length (trainable tokens) and its sum of vocabulary-mean logits (`logits/*`).
  Prefix-shared pairs (`branch_ids` field, data/batching.py) go through one forward of their
  `[prompt | chosen | rejected]` rows, and each completion's sums are collected by branch, per
  row or, packed, by `pair_ids` (`completion_sums`): the same numbers with the prompt computed
  once.
* Reference log-probs come from the frozen tree `frozen["ref"]` under `stop_gradient` (the initial
  policy by default, `config.ref.name_or_path` otherwise), or, when the batch carries them
  (`ref_chosen_logps` / `ref_rejected_logps`, e.g. precomputed once and cached), from the batch.
  Reference-free losses (simpo, orpo) load no reference.
* KTO rows (`input_ids`, ..., `label`) also need the KL estimate on mismatched pairs: row i's
  prompt with row i-1's completion, built on device from the batch (`mismatched_pairs`), as TRL
  does by cycling completions within the batch.
* The reward model is the policy with a scalar head (`head="score"`): r = score at the last real
  token of each sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.algos.ref_cache import RefCache
from jaxpost.hf import read_hf_config, resolve_model_dir
from jaxpost.losses.dpo import PreferenceLossConfig, kto_loss, preference_loss
from jaxpost.losses.logprobs import DEFAULT_CHUNK_SIZE, model_token_stats
from jaxpost.losses.reward import bradley_terry_loss
from jaxpost.models.heads import last_token_scores
from jaxpost.train.algorithms import Algorithm, SetupContext, register

FIELDS = ("input_ids", "attention_mask", "positions", "segment_ids", "loss_mask")
SHARED_FIELDS = FIELDS + ("branch_ids",)
CHOSEN, REJECTED = 1, 2  # branch ids of a prefix-shared group (data/batching.py)


def concat_pairs(batch: dict) -> dict:
  """The five sequence fields of chosen rows then rejected rows: [2B, T] each."""
  return {f: jnp.concatenate([batch["chosen_" + f], batch["rejected_" + f]], axis=0)
          for f in FIELDS if "chosen_" + f in batch}


def is_shared(batch: dict) -> bool:
  """True for a prefix-shared pair batch (data.prefix_sharing)."""
  return "branch_ids" in batch


def shared_rows(batch: dict) -> dict:
  """The row fields of a prefix-shared pair batch, [R, T] each."""
  return {f: batch[f] for f in SHARED_FIELDS if f in batch}


def completion_sums(values, batch: dict):
  """(chosen, rejected) [B] sums of the per-token `values` [R, T] of a prefix-shared batch over
  each pair's chosen / rejected tokens (by `branch_ids`; row b is pair b, or by `pair_ids` when
  packed)."""
  return _per_pair(jax.ops.segment_sum, lambda side: values * (batch["branch_ids"] == side),
                   batch, jnp.sum)


def _per_pair(segment_reduce, per_side, batch: dict, row_reduce):
  """(chosen, rejected) [B]: `row_reduce` over each row's entries of `per_side(side)` [R, T]
  (one pair per row), or `segment_reduce` over the entries of each pair (packed rows)."""
  if "pair_ids" not in batch:
    return tuple(row_reduce(per_side(side), axis=-1) for side in (CHOSEN, REJECTED))
  num_pairs = batch["margin"].shape[0]
  pair = batch["pair_ids"].reshape(-1)
  return tuple(segment_reduce(per_side(side).reshape(-1), pair, num_pairs + 1)[:-1]
               for side in (CHOSEN, REJECTED))


def _masked_token_sums(stats: dict, mask) -> dict:
  """Per-token summands of `logps`, `lengths` and `logits_sum` (module docstring)."""
  return {"logps": stats["logprobs"] * mask, "lengths": mask,
          "logits_sum": stats["logit_mean"] * mask}


def sequence_stats(model, params, batch: dict, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   dropout_rng=None) -> dict:
  """Per-row `logps` (sum over loss_mask), `lengths` and `logits_sum` of a causal LM, fp32 [B]."""
  stats = model_token_stats(model, params, batch, chunk_size=chunk_size, dropout_rng=dropout_rng)
  sums = _masked_token_sums(stats, batch["loss_mask"].astype(jnp.float32))
  return {k: jnp.sum(v, axis=-1) for k, v in sums.items()}


def pair_stats(model, params, batch: dict, chunk_size: int = DEFAULT_CHUNK_SIZE,
               dropout_rng=None) -> dict:
  """`sequence_stats` of both sides of a pair batch: {name: (chosen [B], rejected [B])}, from
  one forward of the 2B unshared rows or of the prefix-shared rows."""
  if not is_shared(batch):
    stats = sequence_stats(model, params, concat_pairs(batch), chunk_size, dropout_rng)
    return {k: tuple(jnp.split(v, 2)) for k, v in stats.items()}
  rows = shared_rows(batch)
  stats = model_token_stats(model, params, rows, chunk_size=chunk_size, dropout_rng=dropout_rng)
  sums = _masked_token_sums(stats, rows["loss_mask"].astype(jnp.float32))
  return {k: completion_sums(v, batch) for k, v in sums.items()}


def _chunk(config) -> int:
  return int(config.get("logprob_chunk_size", DEFAULT_CHUNK_SIZE))


def _dropout_rng(rng, ctx):
  """The policy forward's dropout key (LoRA dropout) in training; None in eval."""
  return rng if ctx.training else None


def reference_logps(module, ref_params, batch: dict, chunk_size: int = DEFAULT_CHUNK_SIZE):
  """(ref_chosen_logps, ref_rejected_logps) [B] of a pair batch, without gradient."""
  stats = pair_stats(module, jax.lax.stop_gradient(ref_params), batch, chunk_size)
  return tuple(jax.lax.stop_gradient(x) for x in stats["logps"])


def _batch_reference(batch, frozen, ctx):
  if "ref_chosen_logps" in batch:
    return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
  if "ref" in frozen:
    return reference_logps(ctx.modules["ref"], frozen["ref"], batch, _chunk(ctx.config))
  return None, None


def loss_config(config, paired: bool) -> PreferenceLossConfig:
  """The run's preference loss keys (validated by PreferenceLossConfig), for pair batches
  (algorithm "dpo") or unpaired rows (algorithm "kto")."""
  cfg = PreferenceLossConfig.from_config(config)
  if cfg.paired != paired:
    raise ValueError("config.loss_type='kto' trains on unpaired rows: set config.algorithm='kto'"
                     if paired else "config.algorithm='kto' needs config.loss_type='kto', got "
                     f"{cfg.loss_type!r}")
  return cfg


def check_preference_keys(config, paired: bool):
  """Up-front check (Algorithm.check_config) of the loss keys and of `ref.name_or_path`."""
  cfg = loss_config(config, paired)
  ref_cfg = config.get("ref", None)
  name = ref_cfg.get("name_or_path", "") if ref_cfg is not None else ""
  if name and cfg.needs_reference:
    try:
      read_hf_config(resolve_model_dir(name))
    except (FileNotFoundError, NotADirectoryError) as e:
      raise ValueError(f"config.ref.name_or_path={name!r}: {e}") from e


def dpo_loss_fn(params, frozen, batch, rng, ctx):
  """Loop loss for `config.algorithm="dpo"` (pairwise loss types); see the module docstring."""
  cfg = loss_config(ctx.config, paired=True)
  stats = pair_stats(ctx.model, params, batch, _chunk(ctx.config), _dropout_rng(rng, ctx))
  (pc, pr), (nc, nr), (sc, sr) = (stats[k] for k in ("logps", "lengths", "logits_sum"))
  rc, rr = _batch_reference(batch, frozen, ctx)
  return preference_loss(cfg, pc, pr, nc, nr, rc, rr, jax.lax.stop_gradient(sc),
                         jax.lax.stop_gradient(sr))


def mismatched_pairs(batch: dict) -> dict:
  """Row i = row i's prompt followed by row (i-1 mod B)'s completion, truncated to T.

  Rows must be unpacked and right-padded with the completion as the trailing trainable span
  (prompt/completion rows). The result has the five sequence fields; its loss_mask marks the
  borrowed completion.
  """
  ids, loss_mask = batch["input_ids"], batch["loss_mask"].astype(jnp.int32)
  b, t = ids.shape
  prompt_len = jnp.argmax(loss_mask > 0, axis=-1)
  comp_len = jnp.sum(loss_mask, axis=-1)
  src = (jnp.arange(b) - 1) % b
  offset = jnp.arange(t)[None, :] - prompt_len[:, None]  # position within the new completion
  in_prompt = offset < 0
  in_comp = (offset >= 0) & (offset < comp_len[src][:, None])
  take = jnp.clip(prompt_len[src][:, None] + offset, 0, t - 1)
  borrowed = jnp.take_along_axis(ids[src], take, axis=1)
  real = in_prompt | in_comp
  new_ids = jnp.where(in_prompt, ids, jnp.where(in_comp, borrowed, 0))
  return {"input_ids": new_ids, "attention_mask": real.astype(ids.dtype),
          "positions": jnp.maximum(jnp.cumsum(real, axis=-1) - 1, 0).astype(ids.dtype),
          "segment_ids": real.astype(ids.dtype), "loss_mask": in_comp.astype(ids.dtype)}


def kto_loss_fn(params, frozen, batch, rng, ctx):
  """Loop loss for `config.algorithm="kto"`: unpaired rows with a 0/1 `label`."""
  cfg = loss_config(ctx.config, paired=False)
  chunk = _chunk(ctx.config)
  rows = {f: batch[f] for f in FIELDS if f in batch}
  stats = sequence_stats(ctx.model, params, rows, chunk, _dropout_rng(rng, ctx))
  ref = ref_kl = policy_kl = None
  if "ref" in frozen:
    kl_rows = mismatched_pairs(batch)
    both = {f: jnp.concatenate([rows[f], kl_rows[f]]) for f in kl_rows}
    ref_stats = sequence_stats(ctx.modules["ref"], jax.lax.stop_gradient(frozen["ref"]), both,
                               chunk)
    ref, ref_kl = (jax.lax.stop_gradient(x) for x in jnp.split(ref_stats["logps"], 2))
    policy_kl = jax.lax.stop_gradient(
        sequence_stats(ctx.model, jax.lax.stop_gradient(params), kl_rows, chunk)["logps"])
  return kto_loss(cfg, stats["logps"], stats["lengths"], batch["label"], ref, policy_kl, ref_kl,
                  jax.lax.stop_gradient(stats["logits_sum"]))


def pair_scores(module, params, batch: dict, dropout_rng=None):
  """(chosen, rejected) scalar rewards [B] of a scalar-head model: one forward over 2B rows, or
  over the prefix-shared rows (each completion's score at its own last token)."""
  rows = shared_rows(batch) if is_shared(batch) else concat_pairs(batch)
  rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
  scores = module.apply({"params": params}, rows["input_ids"], rows["attention_mask"],
                        rows.get("positions"), rows.get("segment_ids"), rows.get("branch_ids"),
                        rngs=rngs)
  if not is_shared(batch):
    return tuple(jnp.split(last_token_scores(scores, rows["attention_mask"]), 2))
  return tuple(scores.reshape(-1)[i] for i in _last_completion_slots(batch))


def _last_completion_slots(batch: dict):
  """(chosen, rejected) [B] flat indices (row * T + t) of each pair's last chosen / rejected
  token in a prefix-shared batch."""
  branch = batch["branch_ids"]
  slots = jnp.arange(branch.size).reshape(branch.shape)
  return _per_pair(jax.ops.segment_max, lambda side: jnp.where(branch == side, slots, -1),
                   batch, jnp.max)


def reward_loss_fn(params, frozen, batch, rng, ctx):
  """Loop loss for `config.algorithm="rm"`: Bradley–Terry on last-token scores."""
  del frozen
  rc, rr = pair_scores(ctx.model, params, batch, _dropout_rng(rng, ctx))
  margin = batch.get("margin")
  if margin is not None:  # the loader writes NaN for pairs without a margin
    margin = jnp.where(jnp.isnan(margin), 0.0, margin)
  return bradley_terry_loss(rc, rr, margin, ctx.config.get("center_rewards_coefficient", None))


def reference_model(ctx: SetupContext):
  """Frozen trees for DPO/KTO: {"ref": params} or nothing for reference-free loss types.

  `config.ref.name_or_path` names another checkpoint; empty means the initial policy: a copy of
  its weights, or with LoRA the frozen base weights themselves (the model with adapters off;
  no second copy).
  With `config.precompute_ref`, `modules["ref_cache"]` also holds the reference log-probs of every
  training pair (jaxpost/algos/ref_cache.py), which `add_cached_reference` puts into the batches;
  the frozen reference stays for eval batches, which do not pass through the collect phase.
  """
  config = ctx.config
  if not PreferenceLossConfig.from_config(config).needs_reference:
    return {}, {}
  ref_cfg = config.get("ref", None)
  name = ref_cfg.get("name_or_path", "") if ref_cfg is not None else ""
  params, module = ctx.reference(name)
  frozen, modules = {"ref": params}, {"ref": module}
  if config.get("precompute_ref", False):
    modules["ref_cache"] = _reference_cache(ctx, modules["ref"], frozen["ref"], name)
  return frozen, modules


def _reference_cache(ctx: SetupContext, module, params, name: str):
  config = ctx.config
  if config.algorithm != "dpo" or jax.process_count() > 1:
    raise ValueError("config.precompute_ref=True supports single-process config.algorithm='dpo' "
                     f"runs only (got algorithm={config.algorithm!r} on {jax.process_count()} "
                     "processes)")
  chunk = _chunk(config)
  score = jax.jit(lambda p, b: reference_logps(module, p, b, chunk))
  identity = f"{name or config.model.name_or_path}|{config.model.dtype}|{chunk}"
  return RefCache.build(lambda batch: score(params, batch), ctx.train_loader, config.workdir,
                        identity, draws=config.max_steps * config.batch_size,
                        show_progress=config.metrics.progress_bar)


def add_cached_reference(batch, frozen, ctx):
  """Collect phase of "dpo": adds the cached reference log-probs when precompute_ref is on."""
  del frozen
  cache = ctx.modules.get("ref_cache")
  return batch if cache is None else cache.add_to(batch)


DPO = register(Algorithm(name="dpo", loss_fn=dpo_loss_fn, loader_kind="preference",
                         prepare_frozen=reference_model, collect=add_cached_reference,
                         check_config=lambda config: check_preference_keys(config, paired=True)))
KTO = register(Algorithm(name="kto", loss_fn=kto_loss_fn, loader_kind="unpaired",
                         prepare_frozen=reference_model,
                         check_config=lambda config: check_preference_keys(config, paired=False)))
RM = register(Algorithm(name="rm", loss_fn=reward_loss_fn, loader_kind="preference",
                        head="score"))
