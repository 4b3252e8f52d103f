"""Parity check: PPO per-token rewards, whitening, GAE and the clipped losses vs TRL's PPO.

    pip install --no-deps --target /tmp/trl_ppo_site "trl==1.0.0"    # never into the project env
    PYTHONPATH=/tmp/trl_ppo_site python benchmarks/ppo_trl_parity.py  # skips when trl is missing

TRL 1.16 no longer ships `trl.experimental.ppo` (its experimental folder has no PPO); 1.0.0 is
the release used here (`--trl-path` / PYTHONPATH point elsewhere). TRL's functions
`masked_mean`, `masked_var`, `masked_whiten` are imported and called. The per-token reward, GAE
and the two losses are inline statements of `PPOTrainer.train` (ppo_trainer.py, "4. compute
rewards" to "6. compute advantages and returns" and the minibatch loop); `trl_reference` runs
the same statements in torch on the same tensors, TRL's masking included: log-probs past the
EOS set to INVALID_LOGPROB, values kept one position past the EOS (`padding_mask_p1`), the score
added at that position (at the last one when the EOS is the final token).

jaxpost's functions get TRL's layout through their masks: the value / reward mask is
~padding_mask_p1, the advantage mask ~padding_mask. (jaxpost's own PPO passes the completion mask
for both, so the score sits at the EOS itself and V = 0 after it; see algos/ppo.py.)

TRL's side runs in float64 (its k3 as exp(Δ) − 1 − Δ loses digits in float32 for small Δ;
jaxpost uses expm1), jaxpost's in float32; each value's difference is max |ours − TRL| over the
max |TRL| of that tensor. Cases: k1 and k3, whiten_rewards off and on, (γ, λ) = (1, 0.95) (TRL's
defaults) and (0.9, 0.8), rows ending with EOS at varied lengths and rows truncated at the full
length. Prints a table and writes benchmarks/results/ppo_trl_parity.md; exits 1 when any
difference exceeds 1e-5.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

TOL, ABS_FLOOR = 1e-5, 1e-6
B, T = 12, 10  # rows, response length
KL_COEF, CLIP, CLIP_V = 0.05, 0.2, 0.2
RESULT = Path(__file__).parent / "results" / "ppo_trl_parity.md"


def make_inputs(seed: int = 0) -> dict:
  """Seeded tensors in TRL's response layout [B, T]: sequence_lengths = index of the last real
  token (T − 1 for truncated rows), policy / reference / new log-probs, values, new values,
  scores."""
  rng = np.random.default_rng(seed)
  seq = rng.integers(1, T, B)
  seq[:3] = T - 1                     # truncated rows: no position after the last token
  logps = -rng.uniform(0.05, 3.0, (B, T))
  return {k: np.asarray(v, np.float32) if k != "seq" else v for k, v in dict(
      seq=seq, logps=logps, ref=logps + rng.normal(0, 0.3, (B, T)),
      new=logps + rng.normal(0, 0.15, (B, T)), values=rng.normal(0, 1, (B, T)),
      vpred=rng.normal(0, 1, (B, T)), scores=rng.normal(0, 2, B)).items()}


def trl_reference(inp, estimator, whiten_rewards, gamma, lam):
  """TRL's statements in torch (module docstring), with TRL's own masked_* functions."""
  import torch
  from trl.experimental.ppo.ppo_trainer import INVALID_LOGPROB, masked_mean, masked_whiten
  t = {k: torch.tensor(v, dtype=torch.float64 if v.dtype == np.float32 else None)
       for k, v in inp.items()}
  idx = torch.arange(T).repeat(B, 1)
  pad = idx > t["seq"].unsqueeze(1)
  pad_p1 = idx > (t["seq"] + 1).unsqueeze(1)
  logps = torch.masked_fill(t["logps"], pad, INVALID_LOGPROB)
  ref = torch.masked_fill(t["ref"], pad, INVALID_LOGPROB)
  values = torch.masked_fill(t["values"], pad_p1, 0)
  logr = ref - logps
  kl = -logr if estimator == "k1" else (logr.exp() - 1) - logr
  rewards = -KL_COEF * kl
  end = torch.where(t["seq"] + 1 < T, t["seq"] + 1, t["seq"])
  rewards[torch.arange(B), end] += t["scores"]
  if whiten_rewards:
    rewards = torch.masked_fill(masked_whiten(rewards, ~pad_p1, shift_mean=False), pad_p1, 0)
  last, reversed_adv = 0, []
  for i in reversed(range(T)):
    next_values = values[:, i + 1] if i < T - 1 else 0.0
    last = rewards[:, i] + gamma * next_values - values[:, i] + gamma * lam * last
    reversed_adv.append(last)
  adv = torch.stack(reversed_adv[::-1], axis=1)
  returns = adv + values
  adv = torch.masked_fill(masked_whiten(adv, ~pad), pad, 0)
  # the minibatch loss on the whole batch
  new = torch.masked_fill(t["new"], pad, INVALID_LOGPROB)
  vpred = torch.masked_fill(t["vpred"], pad_p1, 0)
  vclip = torch.clamp(vpred, values - CLIP_V, values + CLIP_V)
  vf1, vf2 = torch.square(vpred - returns), torch.square(vclip - returns)
  ratio = torch.exp(new - logps)
  pg1, pg2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - CLIP, 1 + CLIP)
  return {"kl": kl, "rewards": rewards, "advantages": adv, "returns": returns,
          "loss/value": 0.5 * masked_mean(torch.max(vf1, vf2), ~pad_p1),
          "val/clipfrac": masked_mean((vf2 > vf1).float(), ~pad_p1),
          "loss/policy": masked_mean(torch.max(pg1, pg2), ~pad),
          "policy/clipfrac": masked_mean((pg2 > pg1).float(), ~pad)}


def jaxpost_values(inp, estimator, whiten_rewards, gamma, lam):
  import jax.numpy as jnp
  from jaxpost.losses import ppo
  idx = np.arange(T)[None]
  mask = jnp.asarray(idx <= inp["seq"][:, None], jnp.float32)              # ~padding_mask
  mask_p1 = jnp.asarray(idx <= inp["seq"][:, None] + 1, jnp.float32)       # ~padding_mask_p1
  invalid = lambda x: jnp.where(mask > 0, x, 1.0)                          # INVALID_LOGPROB
  logps, ref, new = invalid(inp["logps"]), invalid(inp["ref"]), invalid(inp["new"])
  values = jnp.asarray(inp["values"]) * mask_p1
  rewards, kl = ppo.token_rewards(inp["scores"], logps, ref, mask_p1, KL_COEF, estimator)
  if whiten_rewards:
    rewards = ppo.masked_whiten(rewards, mask_p1, shift_mean=False) * mask_p1
  adv, returns = ppo.gae(rewards, values, mask_p1, gamma, lam)
  adv = ppo.masked_whiten(adv, mask) * mask
  vpred = jnp.asarray(inp["vpred"]) * mask_p1
  vf, vm = ppo.value_loss(vpred, values, returns, mask_p1, CLIP_V)
  pg, pm = ppo.policy_loss(new, logps, adv, mask, CLIP)
  # TRL's kl is 0 past the EOS (INVALID − INVALID); jaxpost's is masked to 0 there too
  return {"kl": kl, "rewards": rewards, "advantages": adv, "returns": returns,
          "loss/value": vf, "val/clipfrac": vm["val/clipfrac_avg"], "loss/policy": pg,
          "policy/clipfrac": pm["policy/clipfrac_avg"]}


def compare(a, b) -> float:
  """max |a − b| / max |b| (b: TRL in float64; the floor ABS_FLOOR for all-zero b)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), ABS_FLOOR))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trl-path", default="", help="prepended to sys.path (a --target dir)")
  args = parser.parse_args()
  if args.trl_path:
    sys.path.insert(0, args.trl_path)
  try:
    import trl
    from trl.experimental.ppo import ppo_trainer  # noqa: F401
  except ImportError as err:
    print(f"skipped: TRL with trl.experimental.ppo is not importable ({err})")
    return 0
  inp = make_inputs()
  lines = [f"# PPO parity vs TRL {trl.__version__} trl.experimental.ppo", "",
           f"B={B} rows, T={T} response tokens, kl_coef={KL_COEF}, cliprange={CLIP}, "
           f"cliprange_value={CLIP_V}; max |jaxpost (fp32) - TRL (fp64)| / max |TRL| "
           f"(tolerance {TOL}).", "",
           "| estimator | whiten_rewards | gamma | lam | value | difference | ok |",
           "|---|---|---|---|---|---|---|"]
  worst = 0.0
  for est, white, (gamma, lam) in itertools.product(("k1", "k3"), (False, True),
                                                    ((1.0, 0.95), (0.9, 0.8))):
    ref = trl_reference(inp, est, white, gamma, lam)
    ours = jaxpost_values(inp, est, white, gamma, lam)
    for key in ref:
      d = compare(ours[key], ref[key].numpy())
      worst = max(worst, d)
      lines.append(f"| {est} | {white} | {gamma} | {lam} | {key} | {d:.2e} | "
                   f"{'yes' if d <= TOL else 'NO'} |")
  lines += ["", f"worst: {worst:.2e} ({'PASS' if worst <= TOL else 'FAIL'})"]
  text = "\n".join(lines) + "\n"
  print(text)
  RESULT.parent.mkdir(exist_ok=True)
  RESULT.write_text(text)
  return 0 if worst <= TOL else 1


if __name__ == "__main__":
  sys.exit(main())
