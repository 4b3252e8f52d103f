"""LoRA: adapters off == base model, only adapters train, merged and PEFT exports equal the
adapted model in transformers / peft, the DPO reference is the base, optimiser state is
adapter-sized."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpost
from jaxpost.configs import dpo as dpo_config
from jaxpost.configs import sft as sft_config
from conftest import make_hf_model
from jaxpost.models import lora
from jaxpost.models.llama import init_params
from jaxpost.hf import build_module
from jaxpost.train import algorithms
from jaxpost.train.export import load_trained
from jaxpost.train.loop import Trainer, train
from jaxpost.train import sharding as sh
from test_train_resume import ROOT

SPEC = lora.LoraSpec(rank=4, alpha=8.0)
IDS = (np.arange(1, 25, dtype=np.int32)[None] * 7 % 128).repeat(2, axis=0)


def tiny_lm(seed=0, **runtime):
  runtime.setdefault("lora_alpha", SPEC.alpha)
  cfg = jaxpost.models.config.LlamaConfig(
      vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, **runtime)
  module = build_module(cfg)
  return module, init_params(module, jax.random.PRNGKey(seed))


def random_adapters(params, spec, seed=1):
  """Adapters with B != 0 (as after training)."""
  adapters = lora.init_adapters(params, spec, jax.random.PRNGKey(seed))
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 100))
  return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), adapters)


@pytest.mark.parametrize("scan", [True, False])
def test_zero_b_gives_base_logits_exactly(scan):
  module, params = tiny_lm(scan_layers=scan)
  adapters = lora.init_adapters(params, SPEC, jax.random.PRNGKey(1))
  paths = lora.target_modules(params, SPEC)
  assert len(paths) == 7 * (1 if scan else 2)  # q k v o gate up down per (stacked) layer
  a = adapters["model"]["layers" if scan else "layers_0"]["self_attn"]["q_proj"]["lora_a"]
  assert a.shape[-2:] == (32, 4) and float(jnp.abs(a).max()) <= 1 / np.sqrt(32)
  base = module.apply({"params": params}, IDS)
  adapted = module.apply({"params": lora.combine(params, adapters)}, IDS)
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))
  trained = module.apply({"params": lora.combine(params, random_adapters(params, SPEC))}, IDS)
  assert float(jnp.abs(trained - base).max()) > 1e-3


def test_low_rank_term_and_merge_match_the_formula():
  module, params = tiny_lm()
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=r"model/layers/self_attn/v_proj")
  adapters = random_adapters(params, spec)
  combined = lora.combine(params, adapters)
  merged = lora.merge(combined, spec.alpha)
  v = merged["model"]["layers"]["self_attn"]["v_proj"]["kernel"]
  ad = adapters["model"]["layers"]["self_attn"]["v_proj"]
  w = params["model"]["layers"]["self_attn"]["v_proj"]["kernel"]
  expected = w + 2.0 * np.einsum("lir,lro->lio", ad["lora_a"], ad["lora_b"])  # alpha / r = 2
  np.testing.assert_allclose(v, expected, rtol=1e-6, atol=1e-6)
  assert not lora.has_adapters(merged)
  np.testing.assert_allclose(module.apply({"params": merged}, IDS),
                             module.apply({"params": combined}, IDS), atol=1e-5)


def test_dropout_only_with_a_dropout_rng():
  module, params = tiny_lm(lora_dropout=0.5)
  combined = lora.combine(params, random_adapters(params, SPEC))
  plain = module.apply({"params": combined}, IDS)
  again = module.apply({"params": combined}, IDS)
  noisy = module.apply({"params": combined}, IDS, rngs={"dropout": jax.random.PRNGKey(3)})
  np.testing.assert_array_equal(plain, again)
  assert float(jnp.abs(noisy - plain).max()) > 1e-4


def test_bad_targets_name_the_key():
  _, params = tiny_lm()
  with pytest.raises(ValueError, match="config.lora.targets.*matches no projection"):
    lora.target_modules(params, lora.LoraSpec(rank=2, targets="model/nothing"))
  with pytest.raises(ValueError, match="config.lora.targets"):
    lora.LoraSpec(rank=2, targets="(")
  with pytest.raises(ValueError, match="config.lora.export"):
    lora.LoraSpec(rank=2, export="gguf")


# ------------------------------------------------------------------------------ training runs


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("base")
  make_hf_model("llama3", path)
  return path


def sft_lora_config(base_dir, workdir, **lora_keys):
  c = sft_config.get_config("synthetic")
  c.update_from_flattened_dict({
      "workdir": str(workdir), "max_steps": 3, "log_every": 1, "checkpoint.every": 0,
      "data.eval": "", "metrics.progress_bar": False, "metrics.tensorboard": False,
      "model.name_or_path": str(base_dir), "model.random_init": False, "lora.rank": 4,
      "lora.alpha": 8.0, "optimizer.learning_rate": 1e-2, "export_hf": "hf"})
  c.model.overrides = {}
  c.lora.update(lora_keys)
  return c


@pytest.fixture(scope="module")
def lora_run(base_dir, tmp_path_factory):
  """One 3-step SFT LoRA run (PEFT export at the end) shared by the export tests; returns its
  workdir, the trainer and what the trainer held before training."""
  workdir = tmp_path_factory.mktemp("lora_run")
  c = sft_lora_config(base_dir, workdir, export="peft")
  trainer = Trainer(c, algorithms.get("sft"), sh.build_mesh(c.mesh), sh.rules_of(c.mesh))
  before = dict(base=jax.tree.map(np.array, trainer.frozen[algorithms.LORA_BASE]),
                adapter_size=lora.num_params(trainer.state.params),
                opt_size=lora.num_params(trainer.state.opt_state),
                trained_leaves=[p[-1].key for p, _ in
                                jax.tree_util.tree_leaves_with_path(trainer.state.params)])
  with jax.set_mesh(trainer.mesh):
    trainer.run()
  return workdir, trainer, before


def test_sft_lora_trains_adapters_only_and_merged_export_matches_transformers(base_dir,
                                                                             lora_run, tmp_path):
  import dataclasses
  from jaxpost.train.export import export_trained
  workdir, trainer, before = lora_run
  # Optimiser state: Adam's two moments per adapter parameter, nothing for the frozen base.
  adapter_size, opt_size = before["adapter_size"], before["opt_size"]
  assert all(key in ("lora_a", "lora_b") for key in before["trained_leaves"])
  assert adapter_size < 0.2 * lora.num_params(before["base"])
  assert 2 * adapter_size <= opt_size <= 2 * adapter_size + 16
  jax.tree.map(np.testing.assert_array_equal, before["base"],
               jax.device_get(trainer.frozen[algorithms.LORA_BASE]))
  b = trainer.state.params["model"]["layers"]["self_attn"]["q_proj"]["lora_b"]
  assert float(jnp.abs(b).max()) > 0  # B moved away from 0

  import torch
  import transformers
  # What the loop's end-of-run export writes for config.lora.export = "merged".
  merged = export_trained(trainer.policy, trainer.state.params, trainer.frozen, trainer.mesh,
                          tmp_path / "merged", dataclasses.replace(trainer.lora, export="merged"))
  lm = load_trained(workdir)
  ours = np.asarray(lm.model.apply({"params": lm.params}, IDS))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
  with torch.no_grad():
    theirs = hf(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
  with torch.no_grad():
    untrained = base(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  assert np.abs(untrained - theirs).max() > 1e-3


def test_peft_export_loads_through_peft(base_dir, lora_run, tmp_path):
  peft = pytest.importorskip("peft")
  import torch
  import transformers
  workdir = lora_run[0]
  out = workdir / "hf"  # written by the run itself (config.lora.export = "peft")
  config = json.loads((out / "adapter_config.json").read_text())
  assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
  cli = tmp_path / "cli"  # the same adapter from the checkpoint through the script
  proc = subprocess.run([sys.executable, "scripts/export_hf.py", f"--workdir={workdir}",
                         f"--out={cli}", "--format=peft"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (cli / "adapter_model.safetensors").read_bytes() == \
      (out / "adapter_model.safetensors").read_bytes()

  lm = load_trained(workdir)
  ours = np.asarray(lm.model.apply({"params": lm.params}, IDS))
  base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(base, str(out)).eval()
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  with torch.no_grad():
    off = model.get_base_model()
    with model.disable_adapter():
      untrained = off(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  assert np.abs(untrained - theirs).max() > 1e-3


def test_lora_dpo_reference_is_the_base_model(tmp_path):
  from test_preference_runs import ROWS
  from jaxpost.data.loader import build_loader
  from jaxpost.algos.preference import reference_logps
  c = dpo_config.get_config("tiny")
  c.update_from_flattened_dict({
      "workdir": str(tmp_path), "max_steps": 4, "log_every": 1, "checkpoint.every": -1,
      "metrics.progress_bar": False, "metrics.tensorboard": False, "lora.rank": 8,
      "lora.alpha": 16.0, "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 0,
      "report.task": "", "eval_at_start": False})
  tokenizer = jaxpost.load_model(c.model.name_or_path, tokenizer=True).tokenizer
  c.data.train = c.data.eval = None
  data = c.data.copy_and_resolve_references()
  data.train = ROWS
  make = lambda: build_loader(data, tokenizer, "preference", c.batch_size, seed=0)
  trainer = Trainer(c, algorithms.get("dpo"), sh.build_mesh(c.mesh), sh.rules_of(c.mesh),
                    make(), make())
  frozen = trainer.frozen
  assert frozen["ref"] is frozen[algorithms.LORA_BASE]  # no second copy of the weights
  batch = next(iter(make()))
  # The same random model without LoRA (seeded init) gives the reference log-probs.
  c_full = c.copy_and_resolve_references()
  c_full.lora.rank = 0
  plain = Trainer(c_full, algorithms.get("dpo"), sh.build_mesh(c.mesh), sh.rules_of(c.mesh),
                  make(), make())
  with jax.set_mesh(trainer.mesh):
    ref = reference_logps(trainer.ctx.modules["ref"], frozen["ref"], batch)
    base = reference_logps(plain.ctx.modules["ref"], plain.frozen["ref"], batch)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(base))
    summary = trainer.run()
  assert summary["loss"] < np.log(2)  # the adapters learned while the reference stayed put
  with jax.set_mesh(trainer.mesh):
    after = reference_logps(trainer.ctx.modules["ref"], trainer.frozen["ref"], batch)
  np.testing.assert_array_equal(np.asarray(after), np.asarray(ref))


def test_split_trainable_moves_the_score_head_to_the_trained_tree():
  _, params = tiny_lm()
  with_score = {"score": {"kernel": jnp.ones((32, 1))}, **params}
  trainable, base = lora.split_trainable(with_score, lora.LoraSpec(rank=4, trainable="score"),
                                         jax.random.PRNGKey(0))
  assert "score" in trainable and "score" not in base
  assert set(trainable["model"]["layers"]["self_attn"]["q_proj"]) == {"lora_a", "lora_b"}
  assert "lora_a" not in base["model"]["layers"]["self_attn"]["q_proj"]


def test_generation_with_adapters_equals_the_merged_model():
  module, params = tiny_lm()
  combined = lora.combine(params, random_adapters(params, SPEC))
  merged = lora.merge(combined, SPEC.alpha)
  run = lambda p: jaxpost.generate(
      jaxpost.LoadedModel(module, p, None, module.cfg, "lm", "tiny"), [[5, 9, 17], [3, 4]],
      max_new_tokens=8, ignore_eos=True)
  adapted, plain = run(combined), run(merged)
  assert adapted.tokens == plain.tokens
  assert adapted.tokens != run(params).tokens
