"""Write a training run's checkpoint as an HF model directory.

    python scripts/export_hf.py --workdir=runs/sft --out=exported/sft [--step=N]
"""

from absl import app, flags

flags.DEFINE_string("workdir", None, "The run's workdir (holds checkpoints/).")
flags.DEFINE_string("out", None, "Output HF directory.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
  del argv
  from jaxpost.hf import save_model
  from jaxpost.train.export import load_trained
  lm = load_trained(flags.FLAGS.workdir, flags.FLAGS.step)
  out = save_model(lm, flags.FLAGS.out)
  print(f"Exported {lm.source} to {out}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
