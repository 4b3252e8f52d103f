"""export_hf at the end of a run and scripts/export_hf.py write the trained weights as an HF
model that transformers loads with the same logits."""

import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

from test_train_resume import ROOT, jaxpost, load_trained, run_config


def test_export_at_end_and_from_checkpoint(tmp_path):
  c = run_config(tmp_path / "run", every=0)
  c.max_steps = 2
  c.export_hf = "hf"
  jaxpost.train(c)
  at_end = tmp_path / "run" / "hf"
  cli = tmp_path / "cli"
  proc = subprocess.run([sys.executable, "scripts/export_hf.py", f"--workdir={tmp_path / 'run'}",
                         f"--out={cli}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  a, b = load_file(at_end / "model.safetensors"), load_file(cli / "model.safetensors")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])

  import torch
  import transformers
  lm = load_trained(tmp_path / "run")
  ids = np.arange(1, 17, dtype=np.int32)[None] * 7 % 256
  ours = np.asarray(lm.model.apply({"params": lm.params}, ids))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(at_end), dtype=torch.float32)
  with torch.no_grad():
    theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  assert (at_end / "config.json").exists() and (at_end / "generation_config.json").exists()
