"""Every documented key of every recipe runs: a few tiny runs set each key (or the whole of a
documented dict key) to a non-default value, so a documented path cannot break unseen.

`test_every_key_is_covered` fails when a recipe gains a key that no run in RUNS sets (add it to
a run, or to EXEMPT with the reason it cannot run here); each RUNS entry then trains for real on
a tiny random Llama with the bundled tokenizer and checks what its keys promise.
"""

import json
import math
import re

import datasets
import pytest

import jaxpost
from jaxpost import configs
from jaxpost.configs import keys
from jaxpost.train import sharding as sh
from jaxpost.train.state import load_sharded

VARIANTS = {"sft": ("default", "lora", "tiny", "synthetic"), "rm": ("default", "tiny"),
            "dpo": ("default", "kto", "lora", "tiny"),
            "grpo": ("default", "dapo", "dr_grpo", "lora", "tiny"),
            "rloo": ("default", "lora", "tiny"),
            "ppo": ("default", "lora", "shared_critic", "tiny"),
            "distill": ("default", "gkd", "seq_kd", "tiny")}

# Keys no run sets, and why.
EXEMPT = {
    "distributed.initialize": "several processes: tests/test_train_multiprocess.py sets it",
    "distributed.coordinator_address": "several processes: tests/test_train_multiprocess.py",
    "distributed.num_processes": "several processes: tests/test_train_multiprocess.py",
    "distributed.process_id": "several processes: tests/test_train_multiprocess.py",
    "distributed.cpu_collectives": "several processes: tests/test_train_multiprocess.py",
    "metrics.wandb": "needs the wandb package and an account; not a test dependency",
    "metrics.wandb_project": "read only by wandb.init (see metrics.wandb)",
    "reward.model": "needs a score-head checkpoint: tests/test_grpo.py::"
                    "test_rloo_with_reference_and_reward_model runs one",
    "reward.model_weight": "with reward.model (tests/test_grpo.py)",
}

REWARDS = """
def short(prompts, completions, answer, **columns):
    return [1.0 / (1 + len(c[0]["content"])) for c in completions]
"""

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PAIRS = [{"prompt": f"Is {i} a number?", "chosen": "yes", "rejected": "no"} for i in range(16)]


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The runs' data files and an HF directory saved from a tiny random model (seed 1)."""
  root = tmp_path_factory.mktemp("recipe_keys")
  chats = [{"conv": [{"role": "user", "content": f"Say {i}."},
                     {"role": "assistant", "content": f"{i}"},
                     {"role": "user", "content": "Again, twice."},
                     {"role": "assistant", "content": f"{i} {i}"}]} for i in range(24)]
  ranked = PAIRS + [{"prompt": "bad row", "chosen": None, "rejected": "no"}]
  datasets.DatasetDict({"tr": datasets.Dataset.from_list(ranked),
                        "ev": datasets.Dataset.from_list(PAIRS[:8])}).save_to_disk(
                            str(root / "pairs_dd"))
  unpaired = [{"prompt": r["prompt"], "completion": c, "label": c == "yes"}
              for r in PAIRS for c in ("yes", "no")]
  tiny = configs.get("dpo:tiny")
  mesh = sh.build_mesh(tiny.mesh)
  lm = load_sharded(tiny.model, mesh, sh.rules_of(tiny.mesh), seed=1)
  jaxpost.save_model(lm, str(root / "tiny_hf"))
  return {"chats": _write_jsonl(root / "chats.jsonl", chats),
          "pairs": _write_jsonl(root / "pairs.jsonl", PAIRS),
          "pairs_dd": str(root / "pairs_dd"),
          "unpaired": _write_jsonl(root / "unpaired.jsonl", unpaired),
          "model": str(root / "tiny_hf"), "cache": str(root / "token_cache"),
          "rewards": _write_text(root / "my_rewards.py", REWARDS) + ":short",
          "rewards_and_builtin": str(root / "my_rewards.py") + ":short,builtin:arithmetic"}


def _write_text(path, text: str) -> str:
  path.write_text(text)
  return str(path)


# (name, recipe:variant, overrides); "{chats}" etc. are paths from the `files` fixture.
RUNS = [
    ("sft_chat_packed_epochs", "sft:tiny", {
        "data.train": "{chats}", "data.columns": {"messages": "conv"},
        "data.train_on": "last_assistant", "data.chat_template": CHATML,
        "data.system_prompt": "Be brief.", "data.packing": True, "data.eval_fraction": 0.25,
        "data.max_length": 64, "data.buckets": [32, 64], "data.shuffle": False,
        "data.prefetch": 0, "num_epochs": 1.0, "batch_size": 4, "grad_accum": 2,
        "keep_freed_memory": False,
        "optimizer.name": "adafactor", "optimizer.schedule": "linear",
        "optimizer.warmup_steps": 0, "optimizer.warmup_ratio": 0.5,
        "optimizer.min_lr_ratio": 0.1, "optimizer.weight_decay": 0.01,
        "optimizer.decay_embeddings": False, "optimizer.max_grad_norm": 0.0,
        "optimizer.learning_rate": 1e-2, "model.scan_layers": False,
        "model.remat_policy": "full", "model.dtype": "bfloat16", "model.param_dtype": "bfloat16",
        "neftune_alpha": 5.0, "mesh.data": 1, "mesh.fsdp": -1,
        "mesh.rules": tuple((n, None if n == "embed" else a) for n, a in sh.DEFAULT_RULES),
        "log_every": 2, "eval_every": 2, "eval_batches": 1, "checkpoint.every": 1,
        "checkpoint.keep": 1, "checkpoint.async_save": False, "metrics.tensorboard": False,
        "metrics.plot": False,
        "data.cache_dir": "{cache}", "seed": 3}),
    ("sft_templates_examples_mixture", "sft:tiny", {
        "data.train": [{"source": "builtin:arithmetic", "name": "solve", "max_rows": 40,
                        "shots": [0, 1], "chat": True, "templates": [
                            {"prompt": "Solve: {prompt[0][content]}",
                             "completion": "{completion[0][content]}"}]},
                       {"source": "builtin:arithmetic", "name": "qa", "max_rows": 200}],
        "data.templates": [{"name": "qa", "prompt": "Q: {prompt[0][content]}",
                            "completion": "A: {completion[0][content]}"}],
        "data.mixture": "examples", "data.mixture_cap": 20, "data.eval": "",
        "max_steps": 2, "batch_size": 4}),
    ("rm_save_to_disk_splits", "rm:tiny", {
        "data.train": "{pairs_dd}", "data.train_split": "tr", "data.eval": "{pairs_dd}",
        "data.eval_split": "ev", "data.drop_bad_rows": True, "data.max_length": 48,
        "data.max_prompt_length": 16, "data.max_completion_length": 16,
        "data.truncation_mode": "keep_start", "data.prefix_sharing": False,
        "center_rewards_coefficient": 0.01,
        "optimizer.b1": 0.8, "optimizer.b2": 0.99, "optimizer.eps": 1e-6, "mesh.data": 1,
        "mesh.tensor": -1, "metrics.cpu_peak_flops": 1e9, "data.task_kind": None,
        "max_update_ratio": 10.0, "max_steps": 2, "batch_size": 4,
        "evals": {"held": {"type": "loss", "every": 1, "batches": 1}}}),
    ("dpo_explicit_reference", "dpo:tiny", {
        "data.train": "{pairs}", "data.eval": "", "ref.name_or_path": "{model}",
        "precompute_ref": True, "data.cache": False, "loss_type": "robust", "label_smoothing": 0.1,
        "sft_weight": 0.5, "beta": 0.2, "logprob_chunk_size": 16, "max_steps": 2,
        "log_every": 1, "batch_size": 4}),
    ("dpo_simpo_lora_own_data", "dpo:tiny", {
        "data.train": "{pairs}", "loss_type": "simpo", "simpo_gamma": 1.0,
        "model.name_or_path": "{model}", "model.random_init": False, "model.overrides": {},
        "lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.1,
        "lora.targets": r"model/layers/self_attn/(q|v)_proj", "lora.trainable": "model/norm",
        "lora.export": "peft", "export_hf": "hf", "max_steps": 2, "batch_size": 4}),
    ("kto_sgd", "dpo:tiny", {
        "algorithm": "kto", "loss_type": "kto", "data.train": "{unpaired}", "data.eval": "",
        "desirable_weight": 1.5, "undesirable_weight": 0.5, "optimizer.name": "sgd",
        "optimizer.momentum": 0.9, "optimizer.schedule": "constant", "eval_at_start": False,
        "report.task": "", "max_steps": 2, "batch_size": 4}),
    ("grpo_every_variant_key", "grpo:tiny", {
        "grpo.num_generations": 2, "grpo.beta": 0.05, "grpo.epsilon": 0.1,
        "grpo.epsilon_high": 0.28, "grpo.num_iterations": 2, "grpo.num_minibatches": 2,
        "grpo.loss_type": "bnpo", "grpo.scale_rewards": "batch",
        "grpo.importance_sampling_level": "sequence", "grpo.use_bias_correction_kl": False,
        "grpo.mask_truncated_completions": True, "grpo.dynamic_sampling": True,
        "grpo.overlong_buffer": 2, "rollout.max_new_tokens": 5, "rollout.temperature": 0.8,
        "rollout.top_k": 50, "rollout.top_p": 0.9,
        "reward.funcs": "{rewards_and_builtin}", "reward.weights": [1.0, 0.5],
        "max_steps": 2, "eval_at_start": False}),
    ("rloo_every_key", "rloo:tiny", {
        "rloo.num_generations": 2, "rloo.beta": 0.1, "rloo.epsilon": 0.3,
        "rloo.epsilon_high": 0.4, "rloo.num_iterations": 2, "rloo.num_minibatches": 2,
        "rloo.normalize_advantages": True, "reward.funcs": "{rewards}", "max_steps": 2,
        "ref.name_or_path": "{model}",
        "eval_at_start": False, "report.task": ""}),
    ("ppo_every_key", "ppo:tiny", {
        "ppo.num_generations": 2, "ppo.num_epochs": 1, "ppo.num_minibatches": 2,
        "ppo.gamma": 0.99, "ppo.lam": 0.9, "ppo.cliprange": 0.3, "ppo.cliprange_value": 0.3,
        "ppo.vf_coef": 0.2, "ppo.ent_coef": 0.01, "ppo.kl_coef": 0.1, "ppo.kl_estimator": "k3",
        "ppo.kl_target": 1.0,
        "ppo.kl_horizon": 100.0, "ppo.whiten_rewards": True, "ppo.missing_eos_penalty": 1.0,
        "ppo.reward_clip": 0.75, "ppo.dual_clip": 3.0, "critic.name_or_path": "{model}",
        "critic.share_backbone": True, "critic.warmup_steps": 1,
        "critic.optimizer.max_grad_norm": 0.5, "reward.funcs": "{rewards}", "max_steps": 2,
        "eval_at_start": False, "report.task": ""}),
    ("distill_every_loss_key", "distill:tiny", {
        "teacher.name_or_path": "{model}", "distill.beta": 0.5, "distill.temperature": 2.0,
        "distill.temperature_scale": False, "distill.hard_weight": 0.2, "distill.top_k": 8,
        "max_steps": 2, "batch_size": 4, "eval_at_start": False, "report.task": ""}),
    ("seq_kd_student_from_teacher_layers", "distill:seq_kd", {
        "teacher.name_or_path": "{model}", "student.init": "teacher_layers:1",
        "distill.lmbda": 0.5, "rollout.max_new_tokens": 4, "rollout.temperature": 0.8,
        "rollout.top_k": 20, "rollout.top_p": 0.9, "max_steps": 2, "batch_size": 4,
        "eval_at_start": False, "report.task": ""}),
]
HARNESS = {"metrics.progress_bar": False}  # every run: quiet, and its own workdir


def _set(config, key: str, value):
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  with node.ignore_type():
    setattr(node, leaf, value)


def _resolved(value, files):
  """"{name}" -> files[name]; anything else as it is."""
  match = isinstance(value, str) and re.fullmatch(r"\{(\w+)\}", value)
  return files[match.group(1)] if match else value


def run_config(recipe: str, overrides: dict, files: dict, workdir: str):
  config = configs.get(recipe)
  for key, value in {**HARNESS, **overrides, "workdir": workdir}.items():
    _set(config, key, _resolved(value, files))
  return config


def _plain(value) -> str:
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  return json.dumps(value, sort_keys=True, default=str)


def recipe_keys(recipe: str) -> set:
  docs = keys.all_docs()
  return {k for v in VARIANTS[recipe] for k in keys.flatten(configs.get(f"{recipe}:{v}"), docs)}


def test_every_key_is_documented_and_every_doc_names_a_key():
  docs = keys.all_docs()
  all_keys = set().union(*map(recipe_keys, VARIANTS))
  assert sorted(all_keys - set(docs)) == []
  assert sorted(set(docs) - all_keys) == []


def test_every_key_is_covered():
  """Each key of each recipe differs from its recipe default in at least one run."""
  fake_files = {k: f"/tmp/{k}" for k in ("chats", "pairs", "pairs_dd", "unpaired", "model", "cache",
                                                "rewards", "rewards_and_builtin")}
  docs = keys.all_docs()
  covered = set()
  for name, recipe, overrides in RUNS:
    config = keys.flatten(run_config(recipe, overrides, fake_files, f"/tmp/{name}"), docs)
    default = keys.flatten(configs.get(recipe.split(":")[0]), docs)
    covered |= {k for k, v in config.items() if k not in default or _plain(v) != _plain(default[k])}
  for recipe in VARIANTS:
    missing = recipe_keys(recipe) - covered - set(EXEMPT)
    assert sorted(missing) == [], f"configs/{recipe}.py keys no run in RUNS sets"
  assert set(EXEMPT) <= set().union(*map(recipe_keys, VARIANTS))  # no stale exemption


def _records(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


@pytest.mark.parametrize("name,recipe,overrides", RUNS, ids=[r[0] for r in RUNS])
def test_run(name, recipe, overrides, files, tmp_path, capsys):
  config = run_config(recipe, overrides, files, str(tmp_path))
  out = jaxpost.train(config)
  records = _records(tmp_path)
  train = [r for r in records if "loss" in r]
  assert train and all(math.isfinite(r["loss"]) for r in train)
  CHECKS.get(name, lambda *a: None)(out, records, tmp_path, capsys.readouterr().out)


def _check_epochs(out, records, workdir, stdout):
  # 24 chats, 6 held out: 18 train examples; packing estimates the steps of one epoch.
  assert out["step"] >= 1 and train_of(records)[-1]["epoch"] >= 0.99
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == sorted({0, *range(2, out["step"] + 1, 2), out["step"]})
  assert "held-out 0.25 of data.train" in stdout
  assert len(list((workdir / "checkpoints").iterdir())) == 1  # checkpoint.keep=1
  assert not (workdir / "curves.png").exists()  # metrics.plot=False


def _check_named_evaluator(out, records, workdir, stdout):
  """config.evals replaces the default loss + task evaluators: one named loss evaluator, every
  step, logged under its name."""
  evals = [r for r in records if any(k.startswith("eval/") for k in r)]
  assert [r["step"] for r in evals] == [0, 1, 2]
  assert all("eval/held/loss" in r and "eval/held/accuracy" in r for r in evals)
  assert all(k.startswith("eval/held/") for r in evals for k in r if k != "step")


def _check_explicit_reference(out, records, workdir, stdout):
  """Issue 13 item 0: ref.name_or_path = an HF dir written by jaxpost.save_model once failed
  with "No model directory at 'lm'". The reference must be that saved (seed 1) model, not a
  copy of the (seed 0) policy: at step 1 the implied rewards are already non-zero."""
  first = train_of(records)[0]
  assert first["step"] == 1 and abs(first["rewards/chosen"]) > 1e-4
  assert list((workdir / "ref_logps").glob("*.npz"))  # precompute_ref scored with it


def _check_own_data_lora(out, records, workdir, stdout):
  """Custom data.train with the recipe's default data.eval / report.task: no built-in eval;
  the LoRA adapters export in PEFT's format."""
  assert not [k for r in records for k in r if k.startswith(("eval/", "task/"))]
  assert "no eval data: data.train is not a built-in task" in stdout
  assert (workdir / "hf" / "adapter_config.json").exists()


def train_of(records):
  return [r for r in records if "loss" in r]


def _check_grpo_keys(out, records, workdir, stdout):
  """Two reward functions, weighted; completions of at most 5 tokens; a random model never ends
  one that soon, so mask_truncated_completions leaves nothing to train on."""
  rows = train_of(records)
  assert "rewards/short/mean" in rows[0] and "rewards/arithmetic/mean" in rows[0]
  assert all(r["completions/max_length"] <= 5 for r in rows)
  assert all(r["completions/clipped_ratio"] == 1.0 and r["grad_norm"] == 0.0 for r in rows)


def _check_rloo_keys(out, records, workdir, stdout):
  """β > 0 against a named reference: another model, so kl is non-zero from the first step."""
  first = train_of(records)[0]
  assert first["kl"] > 1e-3 and first["grad_norm"] > 0


def _check_ppo_keys(out, records, workdir, stdout):
  """A random model never ends a completion: the missing-EOS penalty makes every score
  negative, clipped at −0.75; β adapts (KL below the target: it shrinks); the shared-backbone
  critic is a score head alone (its checkpointed member); the first iteration is the critic's
  warm-up: the loss is its value term alone; then the entropy bonus (ent_coef 0.01) enters."""
  from jaxpost.train.checkpoint import Checkpointer
  ckpt = Checkpointer(str(workdir), read_only=True)
  try:
    value = ckpt.restore_as_saved(ckpt.latest_step())["params"]["value"]
  finally:
    ckpt.close()
  assert list(value) == ["score"] and value["score"]["kernel"].shape == (64, 1)
  first, second = train_of(records)
  assert "rewards/short/mean" in first and first["val/num_eos_tokens"] == 0
  assert first["objective/scores"] == pytest.approx(-0.75)
  assert first["kl_coef"] == pytest.approx(0.1) and second["kl_coef"] < first["kl_coef"]
  assert first["grad_norm/value"] > 0
  assert first["loss"] == pytest.approx(0.2 * first["loss/value_avg"], rel=1e-5)
  assert second["policy/entropy_avg"] > 1.0
  assert second["loss"] == pytest.approx(second["loss/policy_avg"]
                                         - 0.01 * second["policy/entropy_avg"]
                                         + 0.2 * second["loss/value_avg"], rel=1e-5)


def _check_distill_keys(out, records, workdir, stdout):
  """hard_weight 0.2 mixes the NLL in: loss = 0.8 divergence + 0.2 nll (also as averages)."""
  for r in train_of(records):
    assert r["loss"] == pytest.approx(0.8 * r["distill/divergence"] + 0.2 * r["distill/nll"],
                                      rel=1e-5)


def _check_seq_kd_keys(out, records, workdir, stdout):
  """The student is teacher layer 1; every iteration trains on samples of at most 4 tokens
  (the teacher's, or the student's when the coin says so)."""
  assert json.loads((workdir / "student" / "student.json").read_text())["layers"] == [1]
  rows = train_of(records)
  assert all(r["completions/mean_length"] <= 4 and r["gkd/on_policy"] in (0.0, 1.0)
             for r in rows)


CHECKS = {"sft_chat_packed_epochs": _check_epochs,
          "ppo_every_key": _check_ppo_keys,
          "distill_every_loss_key": _check_distill_keys,
          "seq_kd_student_from_teacher_layers": _check_seq_kd_keys,
          "grpo_every_variant_key": _check_grpo_keys,
          "rloo_every_key": _check_rloo_keys,
          "rm_save_to_disk_splits": _check_named_evaluator,
          "dpo_explicit_reference": _check_explicit_reference,
          "dpo_simpo_lora_own_data": _check_own_data_lora}
