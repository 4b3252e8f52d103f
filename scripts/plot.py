"""Plot the training curves of one or more runs into one PNG (jaxpost/plot.py).

    python scripts/plot.py --workdir=runs/dpo                          # -> runs/dpo/curves.png
    python scripts/plot.py --workdir=runs/dpo --workdir=runs/dpo_lora --out=dpo_vs_lora.png

Panels: loss, the algorithm's key metrics (DPO reward accuracy / margins, RL reward / KL /
completion length, held-out eval curves, ...), learning rate and tokens/s against the step; the
runs overlaid, one colour each. Headless (matplotlib's Agg canvas). Exit status 1 with one line
naming the workdir when a workdir has no metrics.jsonl.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_multi_string("workdir", None, "A run's workdir (holds metrics.jsonl); repeat the "
                          "flag to overlay runs.")
flags.DEFINE_string("out", None, "The PNG to write (default: <workdir>/curves.png for one run, "
                    "curves.png in the current folder for several).")
flags.DEFINE_list("labels", None, "Legend names of the runs, in --workdir order (default: "
                  "the workdirs' folder names).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from jaxpost import plot
  f = flags.FLAGS
  out = f.out or (os.path.join(f.workdir[0], plot.CURVES_FILE) if len(f.workdir) == 1
                  else plot.CURVES_FILE)
  try:
    path = plot.save_curves(f.workdir, out, f.labels)
  except (FileNotFoundError, ValueError) as err:
    sys.exit(f"plot.py: {err}")
  print(f"Wrote {path}")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
