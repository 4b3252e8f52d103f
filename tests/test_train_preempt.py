"""SIGTERM saves and exits cleanly; a NaN loss stops the run naming the step, unsaved."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_train_resume import (ROOT, Checkpointer, SyntheticLoader, jaxpost, load_trained,
                               loader, run_config)
from jaxpost.losses import sft
from jaxpost.train import Algorithm, NonFiniteError, register

# A child that sends itself SIGTERM while fetching batch 4 (i.e. during step 5).
CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_train_resume import jaxpost, loader, run_config, SyntheticLoader

    class TerminatedLoader(SyntheticLoader):
      def __next__(self):
        if self.batches == 4:
          os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()

    c = run_config(sys.argv[1], every=100)
    print("RESULT", jaxpost.train(c, train_loader=loader(c, TerminatedLoader))["preempted"])
""")


def test_sigterm_saves_and_resumes(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(CHILD.format(tests=os.path.join(ROOT, "tests")))
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, str(script), str(workdir)], capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "RESULT True" in proc.stdout
  ckpt = Checkpointer(workdir, read_only=True)
  assert ckpt.latest_step() == 5  # the step in flight finished, then saved
  assert ckpt.restore_meta(5)["data"] == {"batches": 5}
  ckpt.close()
  assert jaxpost.train(run_config(workdir, every=100))["step"] == 6


class PoisonedLoader(SyntheticLoader):
  """Adds a float field `poison` [B]: NaN in batch 4 (step 5), 1 elsewhere."""

  def __next__(self):
    batch = super().__next__()
    value = np.nan if self.batches == 5 else 1.0
    return {**batch, "poison": np.full(len(batch["input_ids"]), value, np.float32)}


def _poisoned_loss(params, frozen, batch, rng, ctx):
  loss, metrics = sft.sft_loss(params, frozen, batch, rng, ctx)
  return loss * jnp.mean(batch["poison"]), metrics


def test_nan_loss_stops_without_checkpointing_it(tmp_path):
  register(Algorithm(name="sft_poisoned", loss_fn=_poisoned_loss, weight_fn=sft.num_targets))
  c = run_config(tmp_path, every=2)
  c.algorithm = "sft_poisoned"
  c.log_every = 4
  c.max_steps = 10
  with pytest.raises(NonFiniteError, match="at step 5 "):
    jaxpost.train(c, train_loader=loader(c, PoisonedLoader))
  ckpt = Checkpointer(tmp_path, read_only=True)
  assert ckpt.latest_step() == 4
  ckpt.close()
  params = load_trained(tmp_path).params
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))
  logged = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
  assert logged == [2, 4]  # flushed before each checkpoint; nothing from the NaN window
