"""Resume: 6 straight steps == 3 steps, SIGKILL, restart to 6 (bitwise); a save killed midway
leaves the previous checkpoint usable and the resumed run still matches."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from jaxpost.configs import sft as sft_config  # noqa: E402

import jaxpost  # noqa: E402
from jaxpost.train.checkpoint import Checkpointer  # noqa: E402
from jaxpost.train.export import load_trained  # noqa: E402
from jaxpost.data.synthetic import SyntheticLoader  # noqa: E402

MAX_STEPS = 6


def run_config(workdir, every):
  c = sft_config.get_config("synthetic")
  c.update_from_flattened_dict({
      "workdir": str(workdir), "max_steps": MAX_STEPS, "log_every": 1, "checkpoint.every": every,
      "data.eval": "", "metrics.progress_bar": False})
  return c


def loader(c, cls=SyntheticLoader):
  return cls(c.model.overrides.vocab_size, c.batch_size, c.data.max_length, seed=c.seed)


# Trains in a child process that SIGKILLs itself when asked for batch `kill_at` (after step
# `kill_at` has been dispatched and its checkpoint save started), once checkpoint `wait_for`
# is complete. Writes whether checkpoint `kill_at` was complete at that moment.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    from test_train_resume import jaxpost, loader, run_config, SyntheticLoader
    workdir, every, kill_at, wait_for = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

    class KillingLoader(SyntheticLoader):
      def __next__(self):
        if self.batches == kill_at:
          ckpts = os.path.join(workdir, "checkpoints")
          while not os.path.isdir(os.path.join(ckpts, wait_for)):
            time.sleep(0.01)
          done = os.path.isdir(os.path.join(ckpts, str(kill_at)))
          open(os.path.join(workdir, "killed"), "w").write(str(done))
          os.kill(os.getpid(), signal.SIGKILL)
        return super().__next__()

    c = run_config(workdir, every)
    jaxpost.train(c, train_loader=loader(c, KillingLoader))
""")


def _killed_run(tmp_path, workdir, every, kill_at, wait_for):
  script = tmp_path / "child.py"
  script.write_text(CHILD.format(tests=os.path.join(ROOT, "tests")))
  proc = subprocess.run([sys.executable, str(script), str(workdir), str(every), str(kill_at),
                         str(wait_for)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  return (workdir / "killed").read_text() == "True"


def _losses(workdir):
  return [json.loads(line)["loss"] for line in open(workdir / "metrics.jsonl")]


def _assert_bitwise_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


def test_resume_after_kill_is_bitwise_identical(tmp_path):
  straight = tmp_path / "straight"
  c = run_config(straight, every=3)
  jaxpost.train(c, train_loader=loader(c))
  expected = load_trained(straight).params

  # SIGKILL after the step-3 checkpoint: the restart resumes from it at the 4th batch.
  killed = tmp_path / "killed_run"
  _killed_run(tmp_path, killed, every=3, kill_at=3, wait_for=3)
  ckpt = Checkpointer(killed, read_only=True)
  assert ckpt.latest_step() == 3
  assert ckpt.restore_meta(3)["data"] == {"batches": 3}
  ckpt.close()
  result = jaxpost.train(run_config(killed, every=3))
  assert result["step"] == MAX_STEPS
  _assert_bitwise_equal(load_trained(killed).params, expected)
  assert _losses(killed) == _losses(straight)  # steps 4-6 saw the same batches

  # SIGKILL right after the step-4 save started: step 2 is still a usable checkpoint.
  torn = tmp_path / "torn_save"
  save_was_complete = _killed_run(tmp_path, torn, every=2, kill_at=4, wait_for=2)
  partial = [p.name for p in (torn / "checkpoints").iterdir() if p.name.startswith("4.")]
  assert save_was_complete or partial  # the step-4 save was really cut off
  ckpt = Checkpointer(torn, read_only=True)
  assert ckpt.latest_step() == (4 if save_was_complete else 2)
  ckpt.close()
  jaxpost.train(run_config(torn, every=2))
  _assert_bitwise_equal(load_trained(torn).params, expected)
