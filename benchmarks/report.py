"""Joins benchmarks/results/*.md into BENCHMARKS.md.

    python benchmarks/report.py

Each benchmark script writes its own section (machine, command, versions, table) into
benchmarks/results/; this keeps BENCHMARKS.md a faithful copy of the last run of each.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
ORDER = ["suite", "suite_dpo_chat-sft_chat-rm_chat-dpo_lora_chat", "suite_generate", "memory",
         "memory_T512", "forward", "sft", "dpo", "grpo", "grpo_gsm8k", "ppo", "distill", "data",
         "dpo_trl_parity"]

HEADER = """# Benchmarks

Every section below was written by the named script in `benchmarks/` on the machine it names, with
the reference implementation (transformers / TRL) run in the same process or the same run, same
model, rows, batch and lengths; times are medians of at least 3 steps after compilation unless
the section says otherwise. MFU is against the device peak (this 2-core CPU: 290 GFLOP/s fp32, a
2048² matmul; the suite also measures that rate during its own run). The first section is the
one-command suite (`python benchmarks/run.py`, which also rewrites this file); the sections after
it are the standalone scripts' detailed runs. Regenerate with the scripts, then
`python benchmarks/report.py`.
"""


def main():
  results = {p.stem: p.read_text().strip() for p in sorted((ROOT / "results").glob("*.md"))}
  names = [n for n in ORDER if n in results] + sorted(set(results) - set(ORDER))
  text = HEADER + "\n" + "\n\n".join(results[n] for n in names) + "\n"
  (ROOT.parent / "BENCHMARKS.md").write_text(text)
  print(f"BENCHMARKS.md: {', '.join(names)}")


if __name__ == "__main__":
  main()
