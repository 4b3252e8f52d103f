"""Write a training run's checkpoint as an HF model directory (or, for a LoRA run, optionally a
PEFT adapter directory).

    python scripts/export_hf.py --workdir=runs/sft --out=exported/sft [--step=N] [--format=peft]
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging as absl_logging  # noqa: E402

flags.DEFINE_string("workdir", None, "The run's workdir (holds checkpoints/).")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_enum("format", None, ["merged", "peft"],
                  "merged: HF weights (LoRA folded in); peft: adapter_config.json + adapter "
                  "weights (LoRA runs only). Default: the run's config.lora.export.")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.ERROR)  # quiet Orbax's restore INFO/read-only lines
  logging.getLogger("jaxpost").setLevel(logging.INFO)
  from jaxpost.train.export import load_trained, run_lora, save_trained
  f = flags.FLAGS
  lm = load_trained(f.workdir, f.step)
  out = save_trained(lm, run_lora(f.workdir), f.out, f.format)
  print(f"Exported {lm.source} to {out}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
