"""Two local processes (jax.distributed, gloo CPU collectives, 2 fake devices each) train like
one process with 4 devices."""

import os
import socket
import subprocess
import sys

import numpy as np

from test_train_sharding import ROOT, cli_args, losses


def _launch(workdir, devices, *extra):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  cmd = [sys.executable, "scripts/train.py", "--config=configs/sft.py:synthetic",
         *cli_args(workdir, max_steps=3), *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait(proc):
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return err


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  port = _free_port()
  workers = [_launch(multi, 2, "--config.distributed.initialize=True",
                     f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                     "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                     "--config.distributed.cpu_collectives=gloo") for i in range(2)]
  reference = _launch(single, 4)
  assert "over 4 devices in 2 processes" in [_wait(w) for w in workers][0]
  assert "over 4 devices in 1 processes" in _wait(reference)
  assert len(losses(single)) == 3
  np.testing.assert_allclose(losses(multi), losses(single), atol=1e-5)
