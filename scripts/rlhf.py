"""RLHF in one command:  python scripts/rlhf.py --config=configs/rlhf.py[:tiny] --config.x=v

SFT -> reward model -> PPO (configs/rlhf.py documents the stages and their keys; each stage's
keys are those of its recipe, under `stages.<stage>`). Rerunning the same command skips the
complete stages and resumes an interrupted one.

Exit status: 0 every stage trained (or was already complete); 75 a stage was preempted by
SIGTERM: rerun to resume; 1 a stage failed.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

PREEMPTED = 75

config_flags.DEFINE_config_file("config", None, "configs/rlhf.py[:variant]", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jaxpost").setLevel(logging.INFO)
  from jaxpost import rlhf
  from jaxpost.train import CheckpointError, NonFiniteError, ResumeError
  from jaxpost.train.validate import ConfigError
  try:
    results = rlhf.run(flags.FLAGS.config)
  except (ConfigError, NonFiniteError, ResumeError, CheckpointError, ValueError) as err:
    sys.exit(f"rlhf.py: {err}")
  for stage, out in results.items():
    state = "already complete" if out["complete"] else (
        "preempted" if out["preempted"] else "trained")
    print(f"{stage}: {state} at step {out['step']}")
  sys.exit(PREEMPTED if any(out["preempted"] for out in results.values()) else 0)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
