"""Train with any recipe:  python scripts/train.py --config=configs/sft.py[:variant] --config.x=v

`--help` (with a --config) lists every key of that recipe with its value and doc. The config is
locked: an override of a key the recipe does not define fails naming the key and the nearest
known ones, and a bad value fails naming its key before anything is loaded. Equivalent to
`jaxpost.train(config)` from Python.

Exit status: 0 trained to max_steps (or the workdir's run was already complete: nothing ran);
75 (EX_TEMPFAIL) preempted by SIGTERM: rerun the same command to resume (a scheduler may requeue
on it); 1 the run failed (a bad config value, diverged, a checkpoint save failed, the checkpoint
is for other data).
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxpost.configs import cli  # noqa: E402

PREEMPTED = 75  # EX_TEMPFAIL: try again

config_flags.DEFINE_config_file("config", None, "Recipe: configs/<name>.py[:variant]",
                                lock_config=True)


def parse_flags(argv):
  """absl parsing; `--help` lists the recipe's keys; an unknown key fails in one line."""
  return cli.parse_flags(argv, "train.py", __doc__)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # quiet Orbax's per-save INFO lines
  logging.getLogger("jaxpost").setLevel(logging.INFO)
  import jaxpost
  from jaxpost.train import CheckpointError, NonFiniteError, ResumeError
  from jaxpost.train.validate import ConfigError
  config = flags.FLAGS.config
  try:
    metrics = jaxpost.train(config)
  except (ConfigError, NonFiniteError, ResumeError, CheckpointError) as err:
    sys.exit(f"train.py: {err}")
  sys.exit(final_line(metrics, config))


def final_line(metrics: dict, config):
  """Prints how the run ended; returns the exit status."""
  step, workdir = metrics["step"], config.workdir
  if metrics["complete"]:
    print(f"{workdir} is already complete at step {step} (max_steps={config.max_steps}); "
          "nothing to do. Raise max_steps to train on, or use a new workdir.")
    return 0
  if metrics["preempted"]:
    saved = (f"resume with the same command (checkpoint at step {step} in {workdir})"
             if config.checkpoint.every >= 0 else
             "no checkpoint was saved (checkpoint.every < 0): a rerun starts over")
    print(f"preempted at step {step}; {saved}")
    return PREEMPTED
  print(f"step {step}: loss {metrics.get('loss', float('nan')):.4f}; run files "
        f"(metrics.jsonl, TensorBoard events, checkpoints"
        f"{', HF export' if config.export_hf else ''}) in {workdir}")
  return 0


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)
