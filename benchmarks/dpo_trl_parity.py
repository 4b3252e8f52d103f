"""Parity check: first-step DPO (sigmoid, ipo) and reward-model losses and metrics vs TRL.

    python benchmarks/dpo_trl_parity.py      # skips cleanly when trl is not installed

Same model (bundled SmolLM2-135M-Instruct, fp32), same 4 rows of the built-in arithmetic
preference task, one batch, no update. The reference is the policy with 1% multiplicative weight
noise (saved as an HF dir, loaded by both), so the first-step DPO loss is not trivially log 2.
The reward model is the bundled backbone with a seeded score head, saved by jaxpost as
LlamaForSequenceClassification and loaded by both. Prints each metric side by side with the
relative difference; exits 1 if any differs by more than 1e-3 relative.
"""

import sys
import tempfile


TOL = 1e-3
DPO_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")
RM_KEYS = ("loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward")


def jaxpost_batch(tokenizer, rows):
  from jaxpost.data import ChatTokenizer, Limits, normalize_row, tokenize_example
  from jaxpost.data.batching import preference_batch
  ct, lim = ChatTokenizer(tokenizer), Limits(max_length=1 << 20)
  records = [tokenize_example(ct, normalize_row(r, "preference", index=i)[0], "preference", lim)
             for i, r in enumerate(rows)]
  longest = max(max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in records)
  return preference_batch(records, (longest,), ct.pad_id)


def jaxpost_metrics(algo, params, frozen, modules, model, batch, config):
  import jax
  from jaxpost.train import algorithms
  from jaxpost.train.algorithms import LossContext
  loss_fn = algorithms.get(algo).loss_fn
  loss, metrics = jax.jit(lambda p, f, b: loss_fn(p, f, b, None, LossContext(
      model, config, True, modules)))(params, frozen, batch)
  return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}


def trl_dpo(policy_dir, ref_dir, tokenizer, rows, loss_type, tmp):
  import datasets
  import torch
  import transformers
  from trl import DPOConfig, DPOTrainer
  load = lambda d: transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
  args = DPOConfig(output_dir=tmp, report_to=[], max_length=None, use_cpu=True, bf16=False,
                   beta=0.1, loss_type=[loss_type], per_device_train_batch_size=len(rows))
  trainer = DPOTrainer(model=load(policy_dir), ref_model=load(ref_dir), args=args,
                       processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(rows))
  return trl_first_step(trainer, DPO_KEYS)


def trl_rm(rm_dir, tokenizer, rows, tmp):
  import datasets
  import torch
  import transformers
  from trl import RewardConfig, RewardTrainer
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      rm_dir, dtype=torch.float32, num_labels=1)
  model.config.pad_token_id = tokenizer.pad_token_id
  args = RewardConfig(output_dir=tmp, report_to=[], max_length=None, use_cpu=True, bf16=False,
                      per_device_train_batch_size=len(rows))
  trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer,
                          train_dataset=datasets.Dataset.from_list(rows))
  return trl_first_step(trainer, RM_KEYS)


def trl_first_step(trainer, keys):
  import torch
  batch = next(iter(trainer.get_train_dataloader()))
  trainer.model.train()
  with torch.no_grad():
    loss = trainer.compute_loss(trainer.model, batch)
  logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
  return {"loss": float(loss), **{k: float(logged[k]) for k in keys if k in logged}}


def compare(name, ours, theirs, keys) -> int:
  bad = 0
  print(f"\n{name}\n  {'metric':<20}{'jaxpost':>14}{'trl':>14}{'rel diff':>11}")
  for k in keys:
    a, b = ours.get(k), theirs.get(k)
    if a is None or b is None:
      print(f"  {k:<20}{'-' if a is None else f'{a:.6f}':>14}{'-' if b is None else f'{b:.6f}':>14}")
      continue
    rel = abs(a - b) / max(abs(b), 1e-8)
    bad += rel > TOL and abs(a - b) > 1e-6
    print(f"  {k:<20}{a:>14.6f}{b:>14.6f}{rel:>11.2e}")
  return bad


def main() -> int:
  try:
    import trl
  except ImportError:
    print("SKIP: trl is not installed (pip install --no-deps trl)")
    return 0
  import jax
  import jax.numpy as jnp
  import ml_collections

  import jaxpost
  from jaxpost.data.tasks import task_rows
  from jaxpost.hf import resolve_model_dir
  name = "bundled:smollm2-135m-instruct"
  rows = task_rows("arithmetic", "train", "preference")[:4]
  policy = jaxpost.load_model(name)
  tok = policy.tokenizer
  noise = lambda x, k: x * (1 + 0.01 * jax.random.normal(k, x.shape, x.dtype))
  leaves, tree = jax.tree.flatten(policy.params)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  ref_params = jax.tree.unflatten(tree, [noise(x, k) for x, k in zip(leaves, keys)])
  batch = {k: jnp.asarray(v) for k, v in jaxpost_batch(tok, rows).items()}
  bad = 0
  with tempfile.TemporaryDirectory() as tmp:
    ref_dir, rm_dir = f"{tmp}/ref", f"{tmp}/rm"
    jaxpost.save_model(jaxpost.LoadedModel(policy.model, ref_params, tok, policy.config), ref_dir)
    for loss_type in ("sigmoid", "ipo"):
      config = ml_collections.ConfigDict({"loss_type": loss_type, "beta": 0.1})
      ours = jaxpost_metrics("dpo", policy.params, {"ref": ref_params},
                             {"ref": policy.model}, policy.model, batch, config)
      theirs = trl_dpo(str(resolve_model_dir(name)), ref_dir, tok, rows, loss_type, tmp)
      bad += compare(f"DPO loss_type={loss_type}, beta=0.1, 4 pairs", ours, theirs, DPO_KEYS)
    rm = jaxpost.load_model(name, head="score", seed=0)
    jaxpost.save_model(rm, rm_dir)
    ours = jaxpost_metrics("rm", rm.params, {}, {}, rm.model, batch,
                           ml_collections.ConfigDict({"center_rewards_coefficient": None}))
    bad += compare("Reward model (Bradley-Terry), 4 pairs", ours, trl_rm(rm_dir, tok, rows, tmp),
                   RM_KEYS)
  print(f"\ntrl {trl.__version__}, jax {jax.__version__}: "
        f"{'all within' if not bad else f'{bad} metric(s) outside'} {TOL:g} relative")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
