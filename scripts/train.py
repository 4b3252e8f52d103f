"""Train with any recipe:  python scripts/train.py --config=configs/sft.py[:variant] --config.x=v

The config is locked: an override naming a key the recipe does not define fails with the key's
name. Equivalent to `jaxpost.train(config)` from Python.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Recipe: configs/<name>.py[:variant]",
                                lock_config=True)


def parse_flags(argv):
  """absl parsing, with a one-line error for an override of a key the recipe lacks."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as err:
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"train.py: unknown config key {err} in {' '.join(overrides)} "
             "(the config is locked; see configs/base.py for the keys)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # quiet Orbax's per-save INFO lines
  logging.getLogger("jaxpost").setLevel(logging.INFO)
  import jaxpost
  config = flags.FLAGS.config
  metrics = jaxpost.train(config)
  print(f"step {metrics['step']}: loss {metrics.get('loss', float('nan')):.4f}; run files "
        f"(metrics.jsonl, TensorBoard events, checkpoints"
        f"{', HF export' if config.export_hf else ''}) in {config.workdir}")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)
