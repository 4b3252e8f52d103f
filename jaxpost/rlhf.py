"""The SFT -> reward model -> PPO pipeline of configs/rlhf.py (its docstring has the wiring).

    results = jaxpost.rlhf.run(jaxpost.configs.rlhf.get_config("tiny"))

Each stage runs through `jaxpost.train` in its own workdir, so a complete stage is skipped
(`complete` in its result) and an interrupted one resumes; a stage that was preempted stops the
pipeline (rerun the same command).
"""

from __future__ import annotations

import logging
from pathlib import Path

from jaxpost.configs.rlhf import STAGES

log = logging.getLogger("jaxpost.train")


def stage_configs(config) -> dict:
  """{stage: its run config} with the workdirs and the models the later stages start from;
  a stage replaced by `sft_model` / `reward_model` is left out."""
  root = Path(config.workdir)
  sft_model = config.sft_model or str(root / "sft" / config.stages.sft.export_hf)
  reward_model = config.reward_model or str(root / "rm" / config.stages.rm.export_hf)
  out = {}
  for stage in STAGES:
    if (stage == "sft" and config.sft_model) or (stage == "rm" and config.reward_model):
      continue
    c = config.stages[stage].copy_and_resolve_references()
    c.workdir = str(root / stage)
    if stage in ("rm", "ppo"):  # start from the SFT model, read as it was saved
      c.model.name_or_path, c.model.random_init, c.model.overrides = sft_model, False, {}
    if stage == "ppo":
      c.reward.model, c.ref.name_or_path = reward_model, ""
    out[stage] = c
  return out


def run(config) -> dict:
  """Runs the stages in order; {stage: jaxpost.train's result}."""
  from jaxpost.train import train
  results = {}
  for stage, c in stage_configs(config).items():
    if stage in ("sft", "rm") and not c.export_hf:
      raise ValueError(f"config.stages.{stage}.export_hf is empty: the next stage starts from "
                       f"that export")
    log.info("rlhf: stage %s in %s", stage, c.workdir)
    results[stage] = train(c)
    if results[stage]["complete"]:
      log.info("rlhf: stage %s was already complete; skipped", stage)
    if results[stage]["preempted"]:
      log.warning("rlhf: stage %s was preempted; rerun to resume", stage)
      break
  return results
