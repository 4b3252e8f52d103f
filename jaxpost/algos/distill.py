"""Knowledge distillation as algorithms of the one loop: "distill" and "gkd" (math in
jaxpost/losses/distill.py).

distill   soft-label KD (Hinton et al. 2015) on SFT-format data: the student (the policy) is
          trained on the data's completion tokens (loss_mask) to match the frozen teacher,
              L = mean_t [(1 − w) D_t(p_T, p_S) + w NLL_t],   D = JSD_β at temperature τ
          (β = 0: forward KL, the τ² factor on; `distill.*` keys). The two models' logits are
          computed chunk by chunk from their hidden states (never [B, T, V]).
gkd       on-policy distillation (GKD, Agarwal et al. 2024; TRL's GKDTrainer): one loop step is
          one iteration; with probability λ = `distill.lmbda` the batch's completions are
          replaced by the student's own samples, `distill.seq_kd` first replaces them by the
          teacher's (sequence-level KD, Kim & Rush 2016; the coin may still pick the student,
          as in TRL). A row's prompt is its tokens before the first trainable token, sampled
          with algos/rollout.py (one completion per prompt, `rollout.*` keys); then one
          gradient step (train/step.py) of the same loss on the new rows.

Resume is exact: the coin u < λ with u = uniform(fold_in(state.rng, COIN_STREAM)) and the
sampling key fold_in(state.rng, ROLLOUT_STREAM) derive from the train state's RNG, which is
checkpointed and advances once per update.

Teacher: `teacher.name_or_path`, loaded on the training mesh and stored in the compute dtype (a
frozen tree: no optimiser state). Its config.json and tokenizer are checked against the
student's in `check_config`, before anything is loaded or compiled: the same vocabulary size
and the same token -> id map, else a ValueError naming both. Student: the policy
(`model.name_or_path`: any HF checkpoint with the teacher's tokenizer), or with `student.init`
= "teacher_layers:every_other" / "teacher_layers:0,2,..." (models/student.py) a model built once
from the teacher's own layers into `<workdir>/student` (`prepare_config` points
`model.name_or_path` there, so the checkpoints, the export and a resumed run all use it).

Metrics: loss, distill/{divergence, nll, forward_kl} (forward_kl = KL(p_T ‖ p_S) at τ = 1, the
"held-out KL" of the loss evaluator), mean_token_accuracy; gkd adds gkd/on_policy (1 when the
student's samples were trained on), completions/mean_length, time/rollout.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp

from jaxpost import hf
from jaxpost.algos.rollout import RolloutConfig, decode_copy, sample_rollout
from jaxpost.generate import default_pad_id
from jaxpost.losses import sft
from jaxpost.losses.distill import DistillConfig, chunked_token_losses, masked_token_mean
from jaxpost.losses.logprobs import DEFAULT_CHUNK_SIZE, model_hidden_states
from jaxpost.models import student as student_lib
from jaxpost.models.llama import output_kernel
from jaxpost.train.algorithms import Algorithm, applied_params, register
from jaxpost.train.state import model_config
from jaxpost.train.step import train_step

COIN_STREAM, ROLLOUT_STREAM = 0x6C, 0x6D  # fold_in tags of state.rng
LOSS_KEYS = tuple(f.name for f in dataclasses.fields(DistillConfig))
GKD_KEYS = ("lmbda", "seq_kd")
ROLLOUT_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything a distill / gkd run needs from the config, parsed and checked once."""
  loss: DistillConfig
  teacher: str
  student_init: str
  chunk_size: int
  lmbda: float = 0.0
  seq_kd: bool = False
  rollout: Optional[RolloutConfig] = None


def _section(config, name: str, known) -> dict:
  section = config.get(name, None)
  values = section.to_dict() if section is not None else {}
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ValueError(f"config.{name}.{unknown[0]} is not a {config.algorithm} key; known: "
                     f"{sorted(known)}")
  return values


def settings(config) -> Settings:
  """`Settings` of a distill / gkd run; ValueError naming the key of a bad value."""
  gkd = config.algorithm == "gkd"
  section = _section(config, "distill", LOSS_KEYS + GKD_KEYS)
  loss = DistillConfig(**{k: v for k, v in section.items() if k in LOSS_KEYS})
  teacher = _section(config, "teacher", ("name_or_path",)).get("name_or_path", "")
  if not teacher:
    raise ValueError("config.teacher.name_or_path is required: the teacher's HF directory, hub "
                     "id or bundled:<name>")
  init = _section(config, "student", ("init",)).get("init", "")
  chunk = int(config.get("logprob_chunk_size", DEFAULT_CHUNK_SIZE))
  lmbda, seq_kd = float(section.get("lmbda", 0.0)), bool(section.get("seq_kd", False))
  if not gkd:
    if lmbda or seq_kd:
      raise ValueError("config.distill.lmbda / seq_kd sample completions: they need "
                       "config.algorithm='gkd' (configs/distill.py:gkd)")
    return Settings(loss, teacher, init, chunk)
  if not 0.0 <= lmbda <= 1.0:
    raise ValueError(f"config.distill.lmbda={lmbda} must be in [0, 1]")
  ro = _section(config, "rollout", ROLLOUT_KEYS)
  if int(ro.get("max_new_tokens", 0)) < 1 or float(ro.get("temperature", 1.0)) < 0:
    raise ValueError(f"config.rollout.max_new_tokens must be >= 1 and temperature >= 0, got "
                     f"{ro.get('max_new_tokens')}, {ro.get('temperature')}")
  rollout = RolloutConfig(num_generations=1, chunk_size=chunk, recompute_logprobs=False, **ro)
  return Settings(loss, teacher, init, chunk, lmbda, seq_kd, rollout)


# --- setup checks and the student ----------------------------------------------------------------

def check_keys(config):
  """Algorithm.check_config: the keys, the student init, and that student and teacher share the
  vocabulary and tokenizer — from config.json and tokenizer files only, nothing else loaded."""
  s = settings(config)
  teacher_dir = hf.resolve_model_dir(s.teacher)
  teacher_hf = hf.read_hf_config(teacher_dir)
  if config.algorithm == "gkd" and config.data.get("packing", False):
    raise ValueError("config.data.packing=True: gkd samples a completion per row's prompt; "
                     "packed rows have several")
  if config.algorithm == "gkd" and config.data.get("train_on", "") == "all":
    raise ValueError("config.data.train_on='all': gkd's prompt is a row's tokens before its "
                     "first trainable one; train on the assistant turns")
  if s.student_init:
    student_lib.parse_layers(s.student_init, teacher_hf["num_hidden_layers"])
    if config.model.random_init:
      raise ValueError("config.student.init builds the student from the teacher's weights: "
                       "set config.model.random_init=False")
    return  # the student is the teacher's own layers: same vocabulary and tokenizer
  student_cfg, student_dir = model_config(config.model, config.model.name_or_path)
  if student_cfg.vocab_size != teacher_hf["vocab_size"]:
    raise ValueError(f"student vocabulary {student_cfg.vocab_size} (config.model.name_or_path="
                     f"{config.model.name_or_path!r}) != teacher vocabulary "
                     f"{teacher_hf['vocab_size']} (config.teacher.name_or_path={s.teacher!r}): "
                     "distillation needs one tokenizer")
  if student_dir is not None:
    check_same_tokenizer(hf.load_tokenizer(student_dir), hf.load_tokenizer(teacher_dir),
                         config.model.name_or_path, s.teacher)


def check_same_tokenizer(student_tok, teacher_tok, student_name: str, teacher_name: str):
  """ValueError naming a token the two tokenizers map differently (skipped when either model
  has no tokenizer files)."""
  if student_tok is None or teacher_tok is None:
    return
  ours, theirs = student_tok.get_vocab(), teacher_tok.get_vocab()
  if ours == theirs:
    return
  token = next(iter(sorted(set(ours.items()) ^ set(theirs.items()))))[0]
  raise ValueError(f"the tokenizers of the student (config.model.name_or_path={student_name!r}, "
                   f"{len(ours)} tokens) and the teacher (config.teacher.name_or_path="
                   f"{teacher_name!r}, {len(theirs)} tokens) differ (e.g. token {token!r}: "
                   f"{ours.get(token)} vs {theirs.get(token)}); distillation needs one tokenizer")


def prepare_student(config):
  """Algorithm.prepare_config: with `student.init`, builds the student from the teacher's
  layers into `<workdir>/student` (once; process 0) and points model.name_or_path at it."""
  s = settings(config)
  if not s.student_init:
    return config
  out = Path(config.workdir) / "student"
  if jax.process_index() == 0:
    student_lib.build_student(s.teacher, s.student_init, out)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("jaxpost.distill.student")
  config = config.copy_and_resolve_references()
  config.model.name_or_path = str(out)
  return config


def teacher_frozen(ctx):
  """prepare_frozen: the teacher, in the compute dtype."""
  teacher = ctx.load(name_or_path=settings(ctx.config).teacher, head="lm")
  return {"teacher": decode_copy(teacher.params, teacher.model)}, {"teacher": teacher.model}


# --- the loss ----------------------------------------------------------------------------------

def distill_loss(params, frozen, batch, rng, ctx):
  """Algorithm.loss_fn: the distillation loss over the microbatch's trainable tokens."""
  s = settings(ctx.config)
  mask = sft.target_mask(batch)
  teacher = ctx.modules["teacher"]
  hidden = model_hidden_states(ctx.model, params, batch,
                               dropout_rng=rng if ctx.training else None)
  teacher_hidden = model_hidden_states(teacher, frozen["teacher"], batch)
  losses = chunked_token_losses(s.loss, hidden, output_kernel(params, ctx.model.cfg),
                                teacher_hidden, output_kernel(frozen["teacher"], teacher.cfg),
                                batch["input_ids"], mask, s.chunk_size)
  return masked_token_mean(losses, mask)


# --- gkd: one iteration ------------------------------------------------------------------------

def prompts_of(batch: dict, pad_id: int) -> dict:
  """Left-padded prompts [B, W] of right-padded SFT rows [B, W]: each row's tokens before its
  first trainable token (all its tokens when it has none)."""
  trainable = batch["loss_mask"] > 0
  width = trainable.shape[1]
  length = jnp.where(trainable.any(axis=1), jnp.argmax(trainable, axis=1),
                     batch["attention_mask"].sum(axis=1))
  source = jnp.arange(width)[None, :] - (width - length)[:, None]
  valid = source >= 0
  ids = jnp.take_along_axis(batch["input_ids"], jnp.maximum(source, 0), axis=1)
  return {"prompt_input_ids": jnp.where(valid, ids, pad_id),
          "prompt_attention_mask": valid.astype(jnp.int32)}


def on_policy_coin(rng, lmbda: float):
  """The iteration's coin: True with probability λ, from the train state's RNG."""
  return jax.random.uniform(jax.random.fold_in(rng, COIN_STREAM)) < lmbda


def make_gkd_step(setup):
  """Algorithm.make_step of gkd (module docstring): [teacher or student samples] -> update."""
  s = settings(setup.config)
  update = train_step(setup)
  models = {"student": setup.policy.model, "teacher": setup.ctx.modules["teacher"]}
  pad_id = default_pad_id(setup.policy.model.cfg)
  coin = jax.jit(functools.partial(on_policy_coin, lmbda=s.lmbda))

  @functools.partial(jax.jit, static_argnames="source")
  def sample(params, frozen, batch, rng, source):
    params = frozen["teacher"] if source == "teacher" else applied_params(params, frozen)
    rollout = sample_rollout(models[source], params, prompts_of(batch, pad_id),
                             jax.random.fold_in(rng, ROLLOUT_STREAM), s.rollout, setup.mesh)
    return rollout.sequences()

  def step(state, frozen, batch):
    start = time.perf_counter()
    on_policy = s.lmbda > 0 and bool(coin(state.rng))
    source = "student" if on_policy else "teacher" if s.seq_kd else None
    if source is not None:
      batch = sample(state.params, frozen, batch, state.rng, source)
      jax.block_until_ready(batch)
    rollout_time = time.perf_counter() - start
    lengths = jnp.mean(jnp.sum(batch["loss_mask"], axis=1).astype(jnp.float32))
    state, metrics = update(state, frozen, batch)
    return state, {**metrics, "gkd/on_policy": float(on_policy),
                   "completions/mean_length": lengths, "time/rollout": rollout_time}

  return step


register(Algorithm(name="distill", loss_fn=distill_loss, loader_kind="sft",
                   weight_fn=sft.num_targets, prepare_frozen=teacher_frozen,
                   check_config=check_keys, prepare_config=prepare_student))
register(Algorithm(name="gkd", loss_fn=distill_loss, loader_kind="sft",
                   weight_fn=sft.num_targets, prepare_frozen=teacher_frozen,
                   make_step=make_gkd_step, check_config=check_keys,
                   prepare_config=prepare_student))
