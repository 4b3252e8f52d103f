"""Parity check: jaxpost's generalised JSD (dense and chunked) vs TRL 1.16's
`GKDTrainer.generalized_jsd_loss` (trl.experimental.gkd).

    pip install --no-deps --target /tmp/trl_site "trl==1.16.0"         # never into the project env
    PYTHONPATH=/tmp/trl_site python benchmarks/distill_trl_parity.py   # skips when trl is missing

Both sides get the same seeded fp32 logits (student and teacher, [B, T, V]) and labels with
-100 on a prompt part and on right padding. For beta in {0, 0.5, 1} and temperature in {1, 2}:

  per-token   TRL's reduction="none" terms summed over the vocabulary vs
              `losses.distill.generalized_jsd` [B, T]
  batchmean   TRL's loss on shifted logits (student_logits[:, :-1] against labels[:, 1:], as
              GKDTrainer.compute_loss) vs the TRAINING path `chunked_token_losses` (logits fed as
              hidden states through an identity kernel, so the chunked head recomputes them;
              temperature_scale off: TRL has no tau^2) and its masked token mean
  grad        d batchmean / d student logits on both sides (jax.grad through the chunked
              custom VJP vs torch autograd)

Prints a table, writes benchmarks/results/distill_trl_parity.md; exits 1 when any value differs
by more than 1e-5 relative (to the largest TRL value, at least 1e-7).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

TOL, ABS_FLOOR = 1e-5, 1e-7
B, T, V, PROMPT = 4, 12, 96, 3
BETAS, TEMPERATURES = (0.0, 0.5, 1.0), (1.0, 2.0)
RESULT = Path(__file__).parent / "results" / "distill_trl_parity.md"


def make_inputs(seed: int = 0) -> dict:
  """Seeded logits (the teacher sharper than the student) and labels: -100 on the first PROMPT
  positions and after each row's length."""
  rng = np.random.default_rng(seed)
  student = rng.normal(0, 1.5, (B, T, V)).astype(np.float32)
  teacher = (rng.normal(0, 3.0, (B, T, V)) + 0.5 * student).astype(np.float32)
  ids = rng.integers(0, V, (B, T))
  lengths = rng.integers(PROMPT + 2, T + 1, B)
  keep = (np.arange(T)[None] >= PROMPT) & (np.arange(T)[None] < lengths[:, None])
  return {"student": student, "teacher": teacher, "ids": ids, "mask": keep.astype(np.float32),
          "labels": np.where(keep, ids, -100)}


def jaxpost_values(inp, beta, temperature):
  """(per-token [B, T], batchmean, d batchmean / d student logits) from jaxpost."""
  import jax
  import jax.numpy as jnp
  from jaxpost.losses import distill
  per_token = distill.generalized_jsd(jnp.asarray(inp["student"]), jnp.asarray(inp["teacher"]),
                                      beta, temperature)
  cfg = distill.DistillConfig(beta=beta, temperature=temperature, temperature_scale=False)
  eye = jnp.eye(V, dtype=jnp.float32)
  ids, mask = jnp.asarray(inp["ids"]), jnp.asarray(inp["mask"])

  def batchmean(student):
    losses = distill.chunked_token_losses(cfg, student, eye, jnp.asarray(inp["teacher"]), eye,
                                          ids, mask, chunk_size=4)
    return distill.masked_token_mean(losses, mask)[0]

  value, grad = jax.jit(jax.value_and_grad(batchmean))(jnp.asarray(inp["student"]))
  return np.asarray(per_token), float(value), np.asarray(grad)


def trl_values(inp, beta, temperature):
  import torch
  from trl.experimental.gkd import GKDTrainer
  jsd = GKDTrainer.generalized_jsd_loss
  student, teacher = torch.tensor(inp["student"]), torch.tensor(inp["teacher"])
  per_token = jsd(student, teacher, beta=beta, temperature=temperature, reduction="none").sum(-1)
  leaf = student.clone().requires_grad_(True)
  loss = jsd(leaf[:, :-1], teacher[:, :-1], labels=torch.tensor(inp["labels"][:, 1:]), beta=beta,
             temperature=temperature)
  loss.backward()
  return per_token.numpy(), float(loss.detach()), leaf.grad.numpy()


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), ABS_FLOOR))


def main() -> int:
  try:
    import trl
  except ImportError:
    print("trl is not installed (pip install --no-deps --target /tmp/trl_site trl==1.16.0); "
          "skipping")
    return 0
  import jax
  import torch
  inp = make_inputs()
  rows, worst = [], 0.0
  for beta in BETAS:
    for temperature in TEMPERATURES:
      ours, theirs = jaxpost_values(inp, beta, temperature), trl_values(inp, beta, temperature)
      diffs = [rel(a, b) for a, b in zip(ours, theirs)]
      abs_max = max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b)).max())
                    for a, b in zip(ours, theirs))
      worst = max(worst, *diffs)
      rows.append(f"| {beta:g} | {temperature:g} | {ours[1]:.6f} | {theirs[1]:.6f} | "
                  + " | ".join(f"{d:.1e}" for d in diffs) + f" | {abs_max:.1e} |")
  table = ["| beta | T | batchmean jaxpost | batchmean trl | per-token rel diff | "
           "batchmean rel diff | grad rel diff | max abs diff |",
           "|---|---|---|---|---|---|---|---|", *rows]
  verdict = (f"trl {trl.__version__}, torch {torch.__version__}, jax {jax.__version__}: worst "
             f"relative difference {worst:.1e} "
             f"({'within' if worst <= TOL else 'OUTSIDE'} {TOL:g})")
  print("\n".join(table) + "\n\n" + verdict)
  RESULT.write_text(RESULT_HEADER + "\n".join(table) + "\n\n" + verdict + "\n")
  return 0 if worst <= TOL else 1


RESULT_HEADER = f"""# Generalised JSD parity with TRL

`PYTHONPATH=/tmp/trl_site python benchmarks/distill_trl_parity.py` (trl installed with
`pip install --no-deps --target /tmp/trl_site trl==1.16.0`, outside the project). Same seeded
fp32 logits on both sides (B={B}, T={T}, V={V}; labels -100 on {PROMPT} prompt positions and the
right padding). per-token: TRL's `reduction="none"` terms summed over the vocabulary vs
`losses.distill.generalized_jsd`. batchmean: TRL's loss on shifted logits (as
`GKDTrainer.compute_loss`) vs jaxpost's training path (`chunked_token_losses`, the chunked head
recomputing the logits in chunks of 4 positions, then the masked token mean). grad: d batchmean /
d student logits. Relative = max |diff| / max |trl value|.

"""

if __name__ == "__main__":
  sys.exit(main())
