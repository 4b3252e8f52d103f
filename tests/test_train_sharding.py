"""The same 4 steps on 1 device and on 8 fake devices (data=2, fsdp=2, tensor=2) agree."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from jaxpost.configs import sft as sft_config  # noqa: E402

import jaxpost  # noqa: E402
from jaxpost.train.export import load_trained  # noqa: E402

OVERRIDES = dict(max_steps=4, log_every=1, batch_size=8)


def losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r["loss"] for r in rows if "loss" in r]


def cli_args(workdir, **extra):
  flags = {**OVERRIDES, "workdir": workdir, "checkpoint.every": 0, "data.eval": "",
           "metrics.progress_bar": False, **extra}
  return [f"--config.{k}={v}" for k, v in flags.items()]


@pytest.mark.parametrize("extra", [{}, {"lora.rank": 4, "optimizer.learning_rate": 1e-2}],
                         ids=["full", "lora"])
def test_one_device_equals_eight_sharded_devices(tmp_path, extra):
  one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  proc = subprocess.run(
      [sys.executable, "scripts/train.py", "--config=configs/sft.py:synthetic",
       *cli_args(eight, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, **extra)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "'data': 2, 'fsdp': 2, 'tensor': 2" in proc.stderr

  c = sft_config.get_config("synthetic")
  c.update_from_flattened_dict({**OVERRIDES, "workdir": one, "checkpoint.every": 0,
                                "data.eval": "", "metrics.progress_bar": False, **extra})
  assert jax.device_count() == 1
  jaxpost.train(c)

  assert len(losses(one)) == 4
  np.testing.assert_allclose(losses(eight), losses(one), atol=1e-5)
  p1, p8 = load_trained(one).params, load_trained(eight).params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p8, p1)
