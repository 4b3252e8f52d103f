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
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxpost.configs import keys  # noqa: E402

PREEMPTED = 75  # EX_TEMPFAIL: try again

config_flags.DEFINE_config_file("config", None, "Recipe: configs/<name>.py[:variant]",
                                lock_config=True)
HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def _recipe_arg(argv):
  """The value of --config=..., or None."""
  found = [a.split("=", 1)[1] for a in argv if re.match(r"^--?config=", a)]
  return found[-1] if found else None


def _override_keys(argv) -> list:
  """The dotted keys of the --config.<key>[=value] overrides (also --noconfig.<key>)."""
  return [m.group(1) for a in argv if (m := re.match(r"^--?(?:no)?config\.([^=]+)", a))]


def _missing(config, dotted: str):
  """The prefix of `dotted` that `config` lacks (None when the whole path exists)."""
  node, parts = config, dotted.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      return ".".join(parts[:i + 1])
    node = node[part]
  return None


def parse_flags(argv):
  """absl parsing; `--help` lists the recipe's keys; an unknown key fails in one line."""
  help_wanted = any(a in HELP_FLAGS for a in argv[1:])
  argv = [a for a in argv if a not in HELP_FLAGS]
  recipe = _recipe_arg(argv)
  if help_wanted and recipe is None:
    print(f"{__doc__}\n{flags.FLAGS.main_module_help()}\n\nAdd --config=configs/<recipe>.py"
          "[:variant] to --help to list the recipe's keys.")
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
  except (AttributeError, KeyError) as err:
    if recipe is None:
      raise
    config = flags.FLAGS["config"].parser.parse(recipe)
    known = keys.flatten(config)
    bad = [m for m in map(lambda k: _missing(config, k), _override_keys(argv)) if m]
    if not bad:
      raise err
    sys.exit(f"train.py: {keys.unknown_key_message(bad[0], known)} (the config of {recipe} "
             "is locked; --help lists its keys)")
  if help_wanted:
    print(f"{__doc__}\n{keys.format_help(flags.FLAGS.config, recipe)}")
    sys.exit(0)
  return rest


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
