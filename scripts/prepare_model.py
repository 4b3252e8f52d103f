"""Converts the bundled SmolLM2-135M-Instruct GGUF into an HF directory (once) and prints its path.

    python scripts/prepare_model.py [--name smollm2-135m-instruct]
"""

import argparse

from jaxpost.bundled import BUNDLED, bundled_dir


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--name", default="smollm2-135m-instruct", choices=sorted(BUNDLED))
  args = parser.parse_args()
  print(bundled_dir(args.name))


if __name__ == "__main__":
  main()
