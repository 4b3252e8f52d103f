"""Command-line parsing shared by scripts/train.py and scripts/pipeline.py.

Both take one locked `ml_collections` config file flag, `--config=configs/<name>.py[:variant]`,
plus `--config.<key>=<value>` overrides. `--help` (with a --config) lists the config's keys
with their values and docs; an override of a key the config lacks fails in one line naming the
nearest known keys.
"""

from __future__ import annotations

import re
import sys
from typing import Callable

from absl import flags

from jaxpost.configs import keys

HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def recipe_arg(argv):
  """The value of --config=..., or None."""
  found = [a.split("=", 1)[1] for a in argv if re.match(r"^--?config=", a)]
  return found[-1] if found else None


def override_keys(argv) -> list:
  """The dotted keys of the --config.<key>[=value] overrides (also --noconfig.<key>)."""
  return [m.group(1) for a in argv if (m := re.match(r"^--?(?:no)?config\.([^=]+)", a))]


def missing_prefix(config, dotted: str):
  """The prefix of `dotted` that `config` lacks (None when the whole path exists)."""
  node, parts = config, dotted.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      return ".".join(parts[:i + 1])
    node = node[part]
  return None


def parse_flags(argv, script: str, doc: str,
                format_help: Callable = keys.format_help, flatten: Callable = keys.flatten):
  """absl parsing of `script`; `--help` prints `doc` and the config's keys (`format_help(config,
  recipe)`); an unknown key exits with one line naming the nearest keys of `flatten(config)`."""
  help_wanted = any(a in HELP_FLAGS for a in argv[1:])
  argv = [a for a in argv if a not in HELP_FLAGS]
  recipe = recipe_arg(argv)
  if help_wanted and recipe is None:
    print(f"{doc}\n{flags.FLAGS.main_module_help()}\n\nAdd --config=configs/<recipe>.py"
          "[:variant] to --help to list the recipe's keys.")
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
  except (AttributeError, KeyError) as err:
    if recipe is None:
      raise
    config = flags.FLAGS["config"].parser.parse(recipe)
    known = flatten(config)
    bad = [m for m in map(lambda k: missing_prefix(config, k), override_keys(argv)) if m]
    if not bad:
      raise err
    sys.exit(f"{script}: {keys.unknown_key_message(bad[0], known)} (the config of {recipe} "
             "is locked; --help lists its keys)")
  if help_wanted:
    print(f"{doc}\n{format_help(flags.FLAGS.config, recipe)}")
    sys.exit(0)
  return rest
