"""A student made of the teacher's layers: the kept layers are the teacher's weights, and its HF
export loads in transformers with the logits of the teacher's torch model cut to those layers."""

import copy
import json

import numpy as np
import pytest
import torch
from flax import traverse_util

from conftest import make_hf_model
from jaxpost import hf
from jaxpost.models import student

IDS = np.array([[5, 17, 3, 99, 42, 8, 61, 7]], np.int32)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  path = tmp_path_factory.mktemp("teacher")
  return path, make_hf_model("llama3", path, seed=3, num_hidden_layers=5)


def test_parse_layers():
  assert student.parse_layers("teacher_layers:every_other", 5) == (0, 2, 4)
  assert student.parse_layers("teacher_layers:every_other", 30) == tuple(range(0, 30, 2))
  assert student.parse_layers("teacher_layers:4,0", 5) == (4, 0)
  for bad in ("every_other", "teacher_layers:odd", "teacher_layers:0,5", "teacher_layers:1,1"):
    with pytest.raises(ValueError, match="config.student.init"):
      student.parse_layers(bad, 5)


@pytest.mark.parametrize("init, layers", [("teacher_layers:every_other", (0, 2, 4)),
                                          ("teacher_layers:3,1", (3, 1))])
def test_kept_layers_are_the_teachers_and_transformers_agrees(teacher, tmp_path, init, layers):
  teacher_dir, torch_teacher = teacher
  torch_teacher = copy.deepcopy(torch_teacher)
  out = student.build_student(str(teacher_dir), init, tmp_path / "student")
  assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == len(layers)
  ours = hf.load_model(str(out), scan_layers=False)
  theirs = hf.load_model(str(teacher_dir), scan_layers=False)
  flat_s = traverse_util.flatten_dict(ours.params)
  flat_t = traverse_util.flatten_dict(theirs.params)
  for path, value in flat_s.items():
    name = path[1] if path[0] == "model" else ""
    source = (path[0], f"layers_{layers[int(name[7:])]}", *path[2:]) if name.startswith(
        "layers_") else path
    np.testing.assert_array_equal(value, flat_t[source])
  assert len(flat_s) < len(flat_t)

  # transformers: the exported directory vs the teacher's torch model cut to `layers`
  import transformers
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
  torch_teacher.model.layers = torch.nn.ModuleList(
      [torch_teacher.model.layers[i] for i in layers])
  for i, layer in enumerate(torch_teacher.model.layers):
    layer.self_attn.layer_idx = i
  with torch.no_grad():
    want = torch_teacher(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    got = exported(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-5)
  jax_logits = np.asarray(ours.model.apply({"params": ours.params}, IDS))
  np.testing.assert_allclose(jax_logits, want, atol=1e-4)


def test_scanned_and_unrolled_selection_agree(teacher):
  teacher_dir, _ = teacher
  scanned = hf.load_model(str(teacher_dir), scan_layers=True)
  unrolled = hf.load_model(str(teacher_dir), scan_layers=False)
  (ps, cs), (pu, cu) = (student.select_layers(m.params, m.config, (4, 1))
                        for m in (scanned, unrolled))
  assert cs.num_hidden_layers == cu.num_hidden_layers == 2
  np.testing.assert_allclose(hf.build_module(cs).apply({"params": ps}, IDS),
                             hf.build_module(cu).apply({"params": pu}, IDS), atol=1e-5)


def test_an_existing_student_is_reused_and_another_refused(teacher, tmp_path):
  teacher_dir, _ = teacher
  out = student.build_student(str(teacher_dir), "teacher_layers:0,1", tmp_path / "s")
  stamp = (out / "model.safetensors").stat().st_mtime_ns
  assert student.build_student(str(teacher_dir), "teacher_layers:0,1", out) == out
  assert (out / "model.safetensors").stat().st_mtime_ns == stamp
  with pytest.raises(FileExistsError, match="holds another student"):
    student.build_student(str(teacher_dir), "teacher_layers:every_other", out)
