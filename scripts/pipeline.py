"""Run a data-generation pipeline:  python scripts/pipeline.py --config=configs/<pipeline>.py[:variant]

Pipelines: rejection_sampling, self_instruct (:evol for Evol-Instruct), teacher_data. Each writes
into its `workdir`: data.jsonl (rows `data.train` reads), manifest.json (config, model, counts
per filter, timings, versions) and state.json; rerunning the same command continues a killed or
bounded (`pipeline.max_rows`, `pipeline.max_seconds`) run without duplicating or losing rows.
The config is locked as in scripts/train.py: `--help` lists every key with its value and doc, an
unknown key fails naming the nearest ones. Equivalent to `jaxpost.pipelines.run(config)`.

Exit status: 0 complete; 3 stopped early by a bound (rerun to continue); 1 failed (a bad config
value, a bad row, a workdir of another config).
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxpost.configs import cli, keys  # noqa: E402

INCOMPLETE = 3

config_flags.DEFINE_config_file("config", None, "Pipeline: configs/<name>.py[:variant]",
                                lock_config=True)


def _docs(config) -> dict:
  import importlib
  recipe = importlib.import_module(f"jaxpost.configs.{config.pipeline.name}")
  return {**recipe.KEYS, **{f"train.{k}": v for k, v in keys.all_docs().items()}}


def parse_flags(argv):
  return cli.parse_flags(argv, "pipeline.py", __doc__, format_help=lambda c, name: keys.format_help(c, name, _docs(c)),
                         flatten=lambda c: keys.flatten(c, _docs(c)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jaxpost").setLevel(logging.INFO)
  import jaxpost
  from jaxpost.pipelines.common import PipelineError
  from jaxpost.rewards import RewardError
  from jaxpost.train.validate import ConfigError
  config = flags.FLAGS.config
  try:
    report = jaxpost.pipelines.run(config)
  except (PipelineError, RewardError, ConfigError) as err:
    sys.exit(f"pipeline.py: {err}")
  if not report["complete"]:
    print(f"stopped early ({report.get('stopped')}); rerun the same command to continue")
    sys.exit(INCOMPLETE)
  print(f"done: {report['data']} (manifest.json and state.json beside it)")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)
