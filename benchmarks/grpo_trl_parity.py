"""Parity check: GRPO-family and RLOO losses, normalisers, gradients and metrics vs TRL 1.16.

    pip install --no-deps --target /tmp/trl_site "trl==1.16.0"     # never into the project env
    PYTHONPATH=/tmp/trl_site python benchmarks/grpo_trl_parity.py  # skips when trl is missing

Both sides get the same per-token inputs (seeded random log-probs of the policy, the old policy
and the reference; per-sequence advantages; completion masks of varied lengths). TRL's side is a
real `GRPOTrainer` / `RLOOTrainer` (a tiny random Llama, never run) whose per-token log-prob
forward is replaced by one returning those log-probs as a leaf tensor, so `_compute_loss` applies
its own ratios, clipping, KL, normaliser and metrics to them; the gradient is d loss / d log-probs.
Cases: every loss_type x importance_sampling_level, beta 0 and 0.04 (with and without
use_bias_correction_kl), dapo with a global token count larger than the microbatch's, and RLOO.
Prints one table row per value and writes benchmarks/results/grpo_trl_parity.md; exits 1 when
any value differs by more than 1e-5 relative (absolute below 1e-7).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

TOL, ABS_FLOOR = 1e-5, 1e-7
B, G, T, P = 16, 4, 12, 3  # rows, generations per prompt, completion and prompt lengths
EPS_LOW, EPS_HIGH = 0.2, 0.28
GRPO_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max")
RLOO_METRICS = ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max")
RESULT = Path(__file__).parent / "results" / "grpo_trl_parity.md"


def make_inputs(seed: int = 0) -> dict:
  """Seeded per-token inputs: log-probs (policy, old with per-row drift, reference), masks with
  3..T completion tokens, group advantages of random 0/1 rewards, entropies."""
  rng = np.random.default_rng(seed)
  logps = -rng.uniform(0.05, 3.0, (B, T))
  old = logps + rng.normal(0, 0.2, (B, T)) + rng.normal(0, 0.3, (B, 1))
  ref = logps + rng.normal(0, 0.3, (B, T))
  lengths = rng.integers(3, T + 1, B)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  rewards = rng.integers(0, 2, B).astype(np.float32) + rng.normal(0, 0.1, B)
  return {k: v.astype(np.float32) for k, v in dict(
      logps=logps, old=old, ref=ref, mask=mask, rewards=rewards,
      entropy=rng.uniform(0, 4, (B, T))).items()}


def jaxpost_values(inp, loss_type, level, beta, correction, num_items, rloo=False):
  import jax
  import jax.numpy as jnp
  from jaxpost.losses import grpo
  x = {k: jnp.asarray(v) for k, v in inp.items()}
  if rloo:
    adv = grpo.rloo_advantages(x["rewards"], G)
    fn = lambda lp: grpo.rloo_loss(lp, x["old"], adv, x["mask"], EPS_LOW, EPS_HIGH,
                                   entropy=x["entropy"])
  else:
    adv, _ = grpo.group_advantages(x["rewards"], G)
    cfg = grpo.GRPOConfig(num_generations=G, loss_type=loss_type, importance_sampling_level=level,
                          beta=beta, epsilon=EPS_LOW, epsilon_high=EPS_HIGH,
                          use_bias_correction_kl=correction, max_completion_length=T)
    fn = lambda lp: grpo.grpo_loss(cfg, lp, adv, x["mask"], old_logps=x["old"],
                                   ref_logps=x["ref"], entropy=x["entropy"],
                                   num_items_in_batch=num_items)
  (loss, metrics), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(x["logps"])
  return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}, np.asarray(adv)


def save_tiny_model(path, tokenizer) -> str:
  """A tiny random Llama saved at `path` (TRL loads its reference copy from there)."""
  import torch
  import transformers
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
  return str(path)


def tiny_trainer(kind, tmp, model, tokenizer, **args):
  """A real TRL GRPOTrainer / RLOOTrainer over the tiny model (its forward is never used)."""
  import datasets
  import trl
  config_cls, trainer_cls = {"grpo": (trl.GRPOConfig, trl.GRPOTrainer),
                             "rloo": (trl.RLOOConfig, trl.RLOOTrainer)}[kind]
  config = config_cls(output_dir=tmp, report_to=[], use_cpu=True, bf16=False, num_generations=G,
                      per_device_train_batch_size=B, max_completion_length=T, epsilon=EPS_LOW,
                      epsilon_high=EPS_HIGH, **args)
  rows = datasets.Dataset.from_list([{"prompt": "1 + 1 ="}] * B)
  trainer = trainer_cls(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                        args=config, processing_class=tokenizer, train_dataset=rows)
  trainer.model.train()
  # Set by Trainer's training loop to the microbatches of the current accumulation window.
  trainer.current_gradient_accumulation_steps = config.gradient_accumulation_steps
  return trainer


def trl_values(trainer, inp, advantages, num_items, rloo=False):
  """TRL's `_compute_loss` on the same per-token inputs -> (loss, d loss / d logps, metrics)."""
  import torch
  t = {k: torch.tensor(v) for k, v in inp.items()}
  logps = t["logps"].clone().requires_grad_(True)
  trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, t["entropy"], None)
  inputs = {"prompt_ids": torch.ones(B, P, dtype=torch.long), "prompt_mask": torch.ones(B, P),
            "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": t["mask"],
            "advantages": torch.tensor(advantages)}
  if rloo:
    inputs["old_logps"] = (t["old"] * t["mask"]).sum(1)
  else:
    inputs.update(old_per_token_logps=t["old"], ref_per_token_logps=t["ref"],
                  num_items_in_batch=torch.tensor(float(num_items)))
  trainer._metrics["train"].clear()
  loss = trainer._compute_loss(trainer.model, inputs)
  loss.backward()
  metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items()}
  return loss.item(), logps.grad.numpy(), metrics


def rel_diff(a: float, b: float) -> float:
  return abs(a - b) / max(abs(b), 1e-12)


def compare(name, ours, theirs, keys):
  """(markdown row, number of values off by more than TOL relative and ABS_FLOOR absolute)."""
  (loss_a, grad_a, m_a), (loss_b, grad_b, m_b) = ours, theirs
  grad_abs = float(np.max(np.abs(grad_a - grad_b)))
  grad_rel = grad_abs / max(float(np.max(np.abs(grad_b))), 1e-12)
  diffs = {"loss": (rel_diff(loss_a, loss_b), abs(loss_a - loss_b)), "grad": (grad_rel, grad_abs)}
  missing = [k for k in keys if k in m_b and k not in m_a]
  diffs.update({k: (rel_diff(m_a[k], m_b[k]), abs(m_a[k] - m_b[k]))
                for k in keys if k in m_b and k in m_a})
  bad = len(missing) + sum(rel > TOL and gap > ABS_FLOOR for rel, gap in diffs.values())
  worst = max((k for k in diffs if k not in ("loss", "grad")), key=lambda k: diffs[k][0])
  clips = "/".join(f"{m_b[f'clip_ratio/{k}_mean']:.3f}" for k in ("low", "high", "region"))
  kl = f"{m_b['kl']:.6f}" if "kl" in m_b else "-"
  row = (f"| {name} | {loss_a:.7f} | {loss_b:.7f} | {diffs['loss'][0]:.1e} | {grad_rel:.1e} | "
         f"{kl} | {clips} | {diffs[worst][0]:.1e} ({worst}) |"
         + (f" missing: {', '.join(missing)}" if missing else ""))
  return row, bad


def cases():
  for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo"):
    for level in ("token", "sequence"):
      for beta, correction in ((0.0, True), (0.04, True), (0.04, False)):
        yield loss_type, level, beta, correction


# Four groups of G: equal rewards, one None, a single scorable completion, all distinct.
ADVANTAGE_REWARDS = [1.0, 1.0, 1.0, 1.0, 0.5, float("nan"), 2.0, -1.0,
                     float("nan"), 3.0, float("nan"), float("nan"), 0.1, 0.7, 0.2, 1.9]


def trl_group_advantages(rewards, scale):
  """TRL 1.16 GRPOTrainer's advantage step (one reward function, None -> NaN, the default
  multi_objective_aggregation), re-derived from `_generate_and_score_completions` with TRL's
  own `nanstd`: (advantages, reward metrics)."""
  import torch
  from trl.trainer.utils import nanstd
  r = torch.tensor(rewards)
  grouped = r.view(-1, G)
  mean = torch.nanmean(grouped, dim=1).repeat_interleave(G)
  std = nanstd(r).expand_as(r) if scale == "batch" else nanstd(grouped, dim=1).repeat_interleave(G)
  adv = r - mean if scale == "none" else (r - mean) / (std + 1e-4)
  zero_std = torch.isclose(std, torch.zeros_like(std)).float().mean()
  return torch.nan_to_num(adv, nan=0.0).numpy(), {
      "reward": torch.nanmean(r).item(), "reward_std": nanstd(r).item(),
      "frac_reward_zero_std": zero_std.item()}


def trl_rloo_advantages(rewards):
  """TRL 1.16 RLOOTrainer's leave-one-out baseline over scorable siblings, re-derived likewise."""
  import torch
  grouped = torch.tensor(rewards).view(-1, G)
  count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
  baseline = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (count - 1)
  return torch.nan_to_num((grouped - baseline).view(-1), nan=0.0).numpy()


def advantage_rows():
  """(markdown rows, failures) for group_advantages per scale_rewards and rloo_advantages."""
  import jax.numpy as jnp
  from jaxpost.losses import grpo
  rewards = jnp.asarray(ADVANTAGE_REWARDS)
  rows, bad = [], 0
  for scale in ("group", "batch", "none"):
    ours, m_a = grpo.group_advantages(rewards, G, scale_rewards=scale)
    theirs, m_b = trl_group_advantages(ADVANTAGE_REWARDS, scale)
    gap = float(np.max(np.abs(np.asarray(ours) - theirs)))
    worst = max(m_b, key=lambda k: rel_diff(float(m_a[k]), m_b[k]))
    bad += gap > TOL * max(float(np.max(np.abs(theirs))), 1.0)
    bad += sum(rel_diff(float(m_a[k]), m_b[k]) > TOL and abs(float(m_a[k]) - m_b[k]) > ABS_FLOOR
               for k in m_b)
    rows.append(f"| GRPO scale_rewards={scale} | {gap:.1e} | "
                f"{rel_diff(float(m_a[worst]), m_b[worst]):.1e} ({worst}) |")
  gap = float(np.max(np.abs(np.asarray(grpo.rloo_advantages(rewards, G))
                            - trl_rloo_advantages(ADVANTAGE_REWARDS))))
  bad += gap > TOL
  rows.append(f"| RLOO leave-one-out | {gap:.1e} | - |")
  return rows, bad


def main() -> int:
  try:
    import trl
  except ImportError:
    print("SKIP: trl is not installed (pip install --no-deps --target DIR trl; PYTHONPATH=DIR)")
    return 0
  import jax
  import torch
  import transformers

  from jaxpost.hf import resolve_model_dir
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      resolve_model_dir("bundled:smollm2-135m-instruct"))
  inp = make_inputs()
  bad, rows = 0, []
  with tempfile.TemporaryDirectory() as tmp:
    model = save_tiny_model(f"{tmp}/tiny", tokenizer)
    for loss_type, level, beta, correction in cases():
      num_items = 1.5 * inp["mask"].sum() if loss_type == "dapo" else None
      *ours, adv = jaxpost_values(inp, loss_type, level, beta, correction, num_items)
      trainer = tiny_trainer("grpo", tmp, model, tokenizer, loss_type=loss_type, beta=beta,
                             importance_sampling_level=level, use_bias_correction_kl=correction)
      theirs = trl_values(trainer, inp, adv, num_items or inp["mask"].sum())
      name = f"{loss_type} {level} beta={beta:g}" + (
          "" if correction or not beta else " use_bias_correction_kl=False")
      row, n = compare(name, ours, theirs, GRPO_METRICS)
      rows.append(row)
      bad += n
    *ours, adv = jaxpost_values(inp, None, None, 0.0, False, None, rloo=True)
    theirs = trl_values(tiny_trainer("rloo", tmp, model, tokenizer), inp, adv, None, rloo=True)
    row, n = compare("rloo (sequence ratio, mean over sequences)", ours, theirs, RLOO_METRICS)
    rows.append(row)
    bad += n
  adv_rows, n = advantage_rows()
  bad += n
  table = ["| advantages (rewards with None) | max abs diff | worst metric rel diff |",
           "|---|---|---|", *adv_rows, "",
           "| case | loss jaxpost | loss trl | loss rel diff | grad rel diff | kl (trl) | "
           "clip low/high/region (trl) | worst metric rel diff |", "|---|---|---|---|---|---|---|---|",
           *rows]
  verdict = (f"trl {trl.__version__}, transformers {transformers.__version__}, torch "
             f"{torch.__version__}, jax {jax.__version__}: "
             f"{'all within' if not bad else f'{bad} value(s) outside'} {TOL:g} relative")
  print("\n".join(table) + "\n\n" + verdict)
  RESULT.write_text(RESULT_HEADER + "\n".join(table) + "\n\n" + verdict + "\n")
  return 1 if bad else 0


RESULT_HEADER = f"""# GRPO-family / RLOO loss parity with TRL

`PYTHONPATH=/tmp/trl_site python benchmarks/grpo_trl_parity.py` (trl installed with
`pip install --no-deps --target /tmp/trl_site trl==1.16.0`, outside the project). Same seeded
per-token inputs on both sides (B={B} rows in groups of G={G}, T={T}, 3..{T} completion tokens per
row, old-policy drift so that some tokens clip, epsilon={EPS_LOW}, epsilon_high={EPS_HIGH});
TRL's real `GRPOTrainer._compute_loss` / `RLOOTrainer._compute_loss` with its log-prob forward
replaced by those inputs. `grad rel diff` = max |Δ grad| / max |grad| of d loss / d log-probs;
the worst metric is over kl, entropy and clip_ratio/{{low,high,region}}_mean, low_min, high_max;
dapo uses a global token count of 1.5x the microbatch's (as with gradient accumulation).
Advantages: 4 groups of 4 rewards (one group equal, one with a None, one with a single scorable
completion) through TRL's advantage formulas re-derived with TRL's own `nanstd` (they sit
inside `_generate_and_score_completions`, which needs a generation run).

TRL 1.16 semantics reproduced (see `jaxpost/losses/grpo.py`): the KL term is ρ·k3 by default
(`use_bias_correction_kl=True`); `scale_rewards="batch"` centres per group and divides by the
batch std; dr_grpo divides by (microbatch rows x max_completion_length); RLOO's ratio is the
summed (not mean) sequence log-ratio. Where jaxpost differs: with a sequence ratio, the clip
metrics count rows that have completion tokens (TRL counts every row; equal here, no row is
empty), and Δ is clamped to [-20, 20] inside k3 (TRL does not; equal for |Δ| < 20).

"""


if __name__ == "__main__":
  sys.exit(main())
