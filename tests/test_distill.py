"""The distill and gkd algorithms on tiny models: a student made of a tiny teacher's first layer
gets closer to it on held-out rows; GKD's coin follows the train-state RNG (fraction λ) and a
restarted run repeats the same iterations; mismatched vocabularies or tokenizers fail at setup,
before anything is loaded."""

import json
import shutil

import jax
import numpy as np
import pytest

import jaxpost
from conftest import word_tokenizer
from jaxpost import configs
from jaxpost.algos import distill
from jaxpost.train import sharding as sh
from jaxpost.train import state as state_lib
from jaxpost.train.validate import ConfigError


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A tiny random 2-layer teacher with the bundled tokenizer, its logits sharpened x20 (final
  norm scale) so that its distributions are far from a random student's."""
  c = configs.get("distill:tiny")
  lm = state_lib.load_sharded(c.model, sh.build_mesh(c.mesh), sh.rules_of(c.mesh), seed=1)
  lm.params["model"]["norm"]["scale"] = lm.params["model"]["norm"]["scale"] * 20.0
  path = tmp_path_factory.mktemp("teacher")
  jaxpost.save_model(lm, str(path))
  return path


def tiny_run(algorithm, teacher, workdir, **overrides):
  c = configs.get("distill:gkd" if algorithm == "gkd" else "distill:tiny")
  c.model.random_init, c.model.overrides = False, {}
  flat = {"workdir": str(workdir), "teacher.name_or_path": str(teacher),
          "student.init": "teacher_layers:0", "data.max_length": 96, "batch_size": 4,
          "log_every": 1, "eval_batches": 1, "eval_every": 0, "report.task": "",
          "checkpoint.every": -1, "metrics.progress_bar": False, "metrics.tensorboard": False,
          "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 0,
          "optimizer.schedule": "constant"}
  if algorithm == "gkd":
    flat["rollout.max_new_tokens"] = 4
  flat.update(overrides)
  c.update_from_flattened_dict(flat)
  return c


def records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_distill_brings_the_student_closer_on_held_out_rows(teacher_dir, tmp_path):
  c = tiny_run("distill", teacher_dir, tmp_path, max_steps=12, log_every=4, eval_every=4,
               **{"student.init": ""})
  c.model.random_init = True  # the :tiny student: a random 2-layer model
  c.model.overrides = configs.get("distill:tiny").model.overrides
  jaxpost.train(c)
  kl = [r["eval/distill/forward_kl"] for r in records(tmp_path) if "eval/distill/forward_kl" in r]
  assert len(kl) == 4 and all(b < a for a, b in zip(kl, kl[1:])), kl
  assert kl[-1] < 0.95 * kl[0]
  train = [r for r in records(tmp_path) if "loss" in r]
  assert all(r["loss"] == pytest.approx(r["distill/divergence"]) for r in train)


def coins(seed, steps, lmbda):
  """The coins a gkd run draws: state.rng starts as fold_in(PRNGKey(seed), 1)
  (train/state.py) and each update replaces it by split(rng)[0] (train/step.py)."""
  rng, out = jax.random.fold_in(jax.random.PRNGKey(seed), 1), []
  for _ in range(steps):
    out.append(bool(distill.on_policy_coin(rng, lmbda)))
    rng = jax.random.split(rng)[0]
  return out


def test_on_policy_fraction_is_lmbda():
  for lmbda in (0.25, 0.5):
    assert np.mean(coins(0, 2000, lmbda)) == pytest.approx(lmbda, abs=0.035)


def test_gkd_coins_follow_the_state_rng_and_a_restart_repeats_them(teacher_dir, tmp_path):
  """6 steps with checkpoints at 3 and 6; then the checkpoint at 6 is removed (as if killed
  after step 3 was saved) and the restarted run redoes steps 4..6: the same coins, samples and
  updates."""
  keys = ("loss", "gkd/on_policy", "completions/mean_length", "grad_norm")
  c = tiny_run("gkd", teacher_dir, tmp_path, max_steps=6,
               **{"checkpoint.every": 3, "checkpoint.keep": 0, "checkpoint.async_save": False,
                  "eval_at_start": False})
  jaxpost.train(c)
  want = {r["step"]: r for r in records(tmp_path) if "loss" in r}
  assert [want[s]["gkd/on_policy"] for s in range(1, 7)] == [float(x) for x in coins(0, 6, 0.5)]
  assert {want[s]["gkd/on_policy"] for s in want} == {0.0, 1.0}  # this seed draws both
  assert all(want[s]["completions/mean_length"] <= 4 for s in want if want[s]["gkd/on_policy"])
  assert json.loads((tmp_path / "student" / "student.json").read_text())["layers"] == [0]

  shutil.rmtree(tmp_path / "checkpoints" / "6")
  jaxpost.train(c)
  got = {r["step"]: r for r in records(tmp_path) if "loss" in r}  # the last record of a step
  assert len(records(tmp_path)) > len(want)
  for s in range(4, 7):
    for k in keys:
      assert got[s][k] == pytest.approx(want[s][k], rel=1e-6, abs=1e-7), (s, k)


def _fake_teacher(path, vocab_size, tokenizer=None):
  path.mkdir()
  path.joinpath("config.json").write_text(json.dumps({
      "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2}))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(path))
  return path


def test_mismatched_vocabulary_or_tokenizer_fails_before_loading(teacher_dir, tmp_path,
                                                                 monkeypatch):
  def no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded before the check")
  monkeypatch.setattr(state_lib, "load_sharded", no_loading)
  monkeypatch.setattr("jaxpost.train.loop.load_sharded", no_loading)
  small = _fake_teacher(tmp_path / "small", 256)
  c = tiny_run("distill", small, tmp_path / "r1", **{"student.init": ""})
  c.model.name_or_path = str(teacher_dir)
  with pytest.raises(ConfigError, match=r"student vocabulary 49152 .* teacher vocabulary 256"):
    jaxpost.train(c)
  other_tok = word_tokenizer(["a", "b"], ["<s>", "</s>"])
  other = _fake_teacher(tmp_path / "other", 49152, other_tok)
  c = tiny_run("gkd", other, tmp_path / "r2", **{"student.init": ""})
  c.model.name_or_path = str(teacher_dir)
  with pytest.raises(ConfigError, match="tokenizers of the student .* and the teacher .* differ"):
    jaxpost.train(c)
  c = tiny_run("distill", teacher_dir, tmp_path / "r3", **{"student.init": "teacher_layers:2"})
  with pytest.raises(ConfigError, match=r"config.student.init='teacher_layers:2'"):
    jaxpost.train(c)
  c = tiny_run("distill", teacher_dir, tmp_path / "r4", **{"distill.lmbda": 0.5})
  with pytest.raises(ConfigError, match="config.algorithm='gkd'"):
    jaxpost.train(c)
  c = tiny_run("gkd", teacher_dir, tmp_path / "r5", **{"data.train_on": "all"})
  with pytest.raises(ConfigError, match="config.data.train_on='all'"):
    jaxpost.train(c)


def test_teacher_is_frozen_in_the_compute_dtype():
  import types

  import jax.numpy as jnp
  from jaxpost.hf import LoadedModel
  from jaxpost.models.config import LlamaConfig
  from jaxpost.models.llama import LlamaForCausalLM, init_params
  cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, dtype="bfloat16")
  module = LlamaForCausalLM(cfg)
  params = init_params(LlamaForCausalLM(cfg.replace(dtype="float32")), jax.random.PRNGKey(0))
  loaded = LoadedModel(module, params, None, cfg)
  config = configs.get("distill:tiny")
  ctx = types.SimpleNamespace(config=config, load=lambda **kw: loaded)
  frozen, modules = distill.teacher_frozen(ctx)
  assert modules["teacher"] is module
  dtypes = {x.dtype for x in jax.tree.leaves(frozen["teacher"])}
  assert dtypes == {jnp.dtype("bfloat16")}
