"""Runs end to end: exit codes, rerunning finished or changed runs, corrupted checkpoints, failed
saves, blow-up guard, progress output and quiet export (issue 13, items 9-13)."""

import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from test_train_resume import (ROOT, Checkpointer, _killed_run, jaxpost, load_trained,
                               run_config)
from jaxpost.configs import dpo as dpo_config
from jaxpost.data import loader as loader_lib
from jaxpost.train import NonFiniteError

TRAIN = [sys.executable, os.path.join(ROOT, "scripts", "train.py")]
SYNTHETIC = ["--config=" + os.path.join(ROOT, "configs", "sft.py:synthetic"),
             "--config.metrics.progress_bar=False", "--config.log_every=1"]
FIXTURES = Path(ROOT) / "tests" / "fixtures"


def _records(workdir):
  return [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]


def _train_steps(workdir):
  return [r["step"] for r in _records(workdir) if "loss" in r]


# ------------------------------------------------------------------ item 9 / 10: exit codes


def _terminated(workdir, *flags):
  """Runs train.py until it has logged a train step, then SIGTERMs it; returns the process."""
  proc = subprocess.Popen(TRAIN + SYNTHETIC + [f"--config.workdir={workdir}",
                                               "--config.max_steps=100000", *flags],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  start = time.time()
  metrics = workdir / "metrics.jsonl"
  while time.time() < start + 240 and proc.poll() is None:
    if metrics.exists() and os.path.getmtime(metrics) > start and _train_steps(workdir):
      break  # (an older file is truncated when the run opens it: its records do not count)
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  proc.stdout_text, proc.stderr_text = proc.communicate(timeout=120)
  return proc


def test_preemption_exit_code_and_rerunning_a_complete_run(tmp_path):
  workdir = tmp_path / "run"
  # checkpoint.every=-1: no checkpoint is claimed; a distinct exit code says "requeue me".
  proc = _terminated(workdir, "--config.checkpoint.every=-1")
  assert proc.returncode == 75, proc.stderr_text[-3000:]
  assert "saved a checkpoint" not in proc.stderr_text
  assert "no checkpoint saved (checkpoint.every < 0)" in proc.stderr_text
  assert "preempted at step" in proc.stdout_text and "a rerun starts over" in proc.stdout_text
  assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")

  # With checkpoints: "preempted at step N; resume with the same command", checkpoint N saved.
  proc = _terminated(workdir, "--config.checkpoint.every=100000")
  assert proc.returncode == 75, proc.stderr_text[-3000:]
  line = proc.stdout_text.strip().splitlines()[-1]
  assert line.startswith("preempted at step ") and "resume with the same command" in line
  step = int(line.split()[3].rstrip(";"))
  ckpt = Checkpointer(workdir, read_only=True)
  assert ckpt.latest_step() == step
  ckpt.close()
  before = _records(workdir)

  # Rerunning a finished run (max_steps reached) says so, exits 0 and logs nothing new.
  done = subprocess.run(TRAIN + SYNTHETIC + [f"--config.workdir={workdir}",
                                             f"--config.max_steps={step}"],
                        capture_output=True, text=True, timeout=240)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"already complete at step {step}" in done.stdout
  assert "loss nan" not in done.stdout
  assert _records(workdir) == before


# ------------------------------------------------------------------ item 10: metrics on resume


def _tensorboard_scalars(logdir, tag):
  """{step: value} of `tag` as TensorBoard shows it: events files in order, a file's purge
  event (SessionLog START at step p) hiding every earlier event at steps >= p."""
  from tensorboardX.proto import event_pb2
  shown = {}
  for path in sorted(Path(logdir).glob("events.out.tfevents.*"), key=os.path.getmtime):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == 1:  # START
        shown = {s: v for s, v in shown.items() if s < event.step}
      for value in event.summary.value:
        if value.tag == tag:
          assert event.step not in shown, f"step {event.step} of {tag} shown twice"
          shown[event.step] = value.simple_value
  return shown


def test_resume_after_kill_logs_each_step_once(tmp_path):
  workdir = tmp_path / "run"
  # SIGKILL while fetching batch 5: steps 1-5 are logged, the newest checkpoint is step 4.
  _killed_run(tmp_path, workdir, every=2, kill_at=5, wait_for=4)
  assert _train_steps(workdir) == [1, 2, 3, 4, 5]
  jaxpost.train(run_config(workdir, every=2))
  assert _train_steps(workdir) == [1, 2, 3, 4, 5, 6]
  tag = next(t for t in ("train/loss", "loss") if _tensorboard_scalars(workdir / "tensorboard", t))
  shown = _tensorboard_scalars(workdir / "tensorboard", tag)
  assert sorted(shown) == [1, 2, 3, 4, 5, 6]
  losses = {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r}
  np.testing.assert_allclose([shown[s] for s in range(1, 7)], [losses[s] for s in range(1, 7)],
                             rtol=1e-6)


# ------------------------------------------------------------------ item 11: corrupted / failed


def test_corrupted_latest_checkpoints_fall_back_to_an_intact_one(tmp_path, caplog):
  workdir = tmp_path / "run"
  c = run_config(workdir, every=2)
  jaxpost.train(c)  # checkpoints 2, 4, 6
  first = {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r}
  ckpts = workdir / "checkpoints"
  arrays = sorted((ckpts / "6" / "state").rglob("d/*"), key=os.path.getsize)
  with open(arrays[-1], "r+b") as f:  # a truncated array file
    f.truncate(os.path.getsize(arrays[-1]) // 2)
  os.remove(ckpts / "4" / "meta" / "metadata")  # missing metadata

  c = run_config(workdir, every=2)
  c.max_steps = 8
  with caplog.at_level(logging.WARNING, logger="jaxpost.train"):
    result = jaxpost.train(c)
  warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert f"{ckpts / '6'} does not restore" in warnings
  assert f"{ckpts / '4'} does not restore" in warnings
  assert "using checkpoint step 2" in warnings
  assert sorted(p.name for p in (workdir / "checkpoints_unusable").iterdir()) == ["4", "6"]
  assert result["step"] == 8
  resumed = {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r}
  assert sorted(resumed) == list(range(1, 9))
  assert [resumed[s] for s in range(3, 7)] == [first[s] for s in range(3, 7)]  # from step 2
  ckpt = Checkpointer(workdir, read_only=True)
  assert sorted(ckpt.manager.all_steps()) == [4, 6, 8]  # saved again, intact
  ckpt.close()


# A child whose disk "fills up" (RLIMIT_FSIZE: writes over 8 KB fail with EFBIG) after step 3,
# so the async save of step 4 fails in Orbax's background thread; batches then take 0.3 s.
FULL_DISK_CHILD = textwrap.dedent("""
    import resource, signal, sys, time
    sys.path.insert(0, {tests!r})
    from test_train_resume import jaxpost, loader, run_config, SyntheticLoader

    class FillingLoader(SyntheticLoader):
      def __next__(self):
        if self.batches == 3:
          signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
          resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
        if self.batches > 3:
          time.sleep(0.3)
        return super().__next__()

    c = run_config(sys.argv[1], every=4)
    c.max_steps = 12
    try:
      jaxpost.train(c, train_loader=loader(c, FillingLoader))
    except jaxpost.train.CheckpointError as err:
      print("CheckpointError:", err)
""")


def test_failed_async_save_is_reported_at_the_next_boundary(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(FULL_DISK_CHILD.format(tests=os.path.join(ROOT, "tests")))
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, str(script), str(workdir)], capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"CheckpointError: checkpoint save of step 4 to {workdir / 'checkpoints' / '4'} failed" \
      in proc.stdout
  assert "File too large" in proc.stdout
  assert max(_train_steps(workdir)) < 8  # reported before the next save would have been due


# ------------------------------------------------------------------ item 12: blow-up guard


@pytest.mark.parametrize("lr, reason", [(1e30, "non-finite"), (1e3, "max_update_ratio")])
def test_exploding_update_stops_and_the_last_checkpoint_is_usable(tmp_path, lr, reason):
  """Warmup makes step 1's learning rate 0 and step 2's lr / 4: at 1e30 the update norm
  overflows (the old guard saved step 2 with parameters ~1e29), at 1e3 it is ~10^4 x the
  parameters' norm."""
  c = run_config(tmp_path, every=1)
  c.optimizer.learning_rate = lr
  with pytest.raises(NonFiniteError, match=f"at step 2 .*{reason}"):
    jaxpost.train(c)
  ckpt = Checkpointer(tmp_path, read_only=True)
  assert ckpt.latest_step() == 1
  ckpt.close()
  leaves = jax.tree.leaves(load_trained(tmp_path).params)
  assert all(np.isfinite(x).all() and np.abs(x).max() < 10 for x in leaves)


# ------------------------------------------------------------------ item 13: precompute_ref


def test_precompute_ref_scores_only_the_drawn_pairs_of_the_train_table(tmp_path, monkeypatch):
  calls = []
  build_table = loader_lib.build_table
  monkeypatch.setattr(loader_lib, "build_table",
                      lambda *a, **k: calls.append(1) or build_table(*a, **k))
  c = dpo_config.get_config("tiny")
  c.update_from_flattened_dict({
      "workdir": str(tmp_path), "data.train": str(FIXTURES / "preference.jsonl"),
      "data.eval": "", "report.task": "", "precompute_ref": True, "max_steps": 1,
      "batch_size": 2, "checkpoint.every": -1, "metrics.progress_bar": False})
  jaxpost.train(c)
  assert len(calls) == 1  # tokenised once: the cache reuses the train loader's table
  (cache,) = (tmp_path / "ref_logps").glob("*.npz")
  assert len(np.load(cache)["keys"]) == 2  # of the 8 pairs, only the 1 step x 2 drawn ones


# ------------------------------------------------------------------ items 10 + 13: the CLI


@pytest.fixture(scope="module")
def tiny_cli_run(tmp_path_factory):
  """One train.py run of configs/sft.py:tiny on the chat fixture: before/after eval, task
  report, export. Returns (workdir, completed process)."""
  workdir = tmp_path_factory.mktemp("cli") / "run"
  data = str(FIXTURES / "chat_sft.jsonl")
  proc = subprocess.run(TRAIN + [
      "--config=" + os.path.join(ROOT, "configs", "sft.py:tiny"), f"--config.workdir={workdir}",
      f"--config.data.train={data}", f"--config.data.eval={data}", "--config.max_steps=1",
      "--config.batch_size=4", "--config.eval_batches=1", "--config.report.task=arithmetic",
      "--config.report.examples=2",
      "--config.report.max_new_tokens=2", "--config.export_hf=hf",
      "--config.checkpoint.every=1"], capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_progress_lines_and_step_bar_after_the_first_eval(tiny_cli_run):
  _, proc = tiny_cli_run
  err = proc.stderr
  for line in ("eval at step 0: 1 batches", "task report: accuracy", "eval at step 1: 1 batches",
               "export: writing", "export: done"):
    assert line in err, line
  assert "eval @ step 0" in err  # the eval's own bar
  bar = err.index("sft:   0%")
  assert err.index("eval at step 0") < bar and err.index("task report: accuracy") < bar


def test_export_script_is_quiet(tiny_cli_run, tmp_path):
  workdir, _ = tiny_cli_run
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export_hf.py"),
                         f"--workdir={workdir}", f"--out={tmp_path / 'hf'}"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "hf" / "config.json").exists()
  log_lines = [l for l in proc.stderr.splitlines() if re.match(r"[IWEF]\d{4} ", l)]
  assert len(log_lines) == 2 and all("] export: " in l for l in log_lines), log_lines  # no Orbax
  assert "export: restoring step 1" in log_lines[0]


def test_changed_batch_size_names_the_difference(tiny_cli_run):
  workdir, _ = tiny_cli_run
  data = str(FIXTURES / "chat_sft.jsonl")
  proc = subprocess.run(TRAIN + [
      "--config=" + os.path.join(ROOT, "configs", "sft.py:tiny"), f"--config.workdir={workdir}",
      f"--config.data.train={data}", "--config.data.eval=", "--config.max_steps=3",
      "--config.batch_size=2", "--config.report.task="], capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert "batch_size: 4 -> 2" in proc.stderr and "Use a new workdir" in proc.stderr
