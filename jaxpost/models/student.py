"""A smaller student initialised from its teacher's own layers (DistilBERT, Sanh et al. 2019).

    student.init = "teacher_layers:every_other"   layers 0, 2, 4, ... of the teacher
    student.init = "teacher_layers:0,5,10,15"     an explicit list of teacher layer indices

The student keeps the teacher's embeddings, final norm and LM head (so the tokenizer and the
vocabulary are the teacher's) and the listed decoder layers in their order; its config is the
teacher's with num_hidden_layers = len(layers). `select_layers` works on a parameter tree
(scanned: the stacked leading `layers` axis is indexed; unrolled: `layers_<i>` are renamed);
`build_student` writes the result as a normal HF directory (transformers loads it), once: a
directory that already holds the same teacher and layers (`student.json`) is reused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxpost.models.config import LlamaConfig

PREFIX = "teacher_layers:"
MARKER = "student.json"


def parse_layers(init: str, num_layers: int) -> tuple:
  """The teacher layer indices of a `student.init` value for a teacher of `num_layers` layers;
  ValueError naming `student.init` otherwise."""
  if not init.startswith(PREFIX):
    raise ValueError(f"config.student.init={init!r}: expected '{PREFIX}every_other' or "
                     f"'{PREFIX}<i>,<j>,...' (or '' to load model.name_or_path as it is)")
  spec = init[len(PREFIX):]
  if spec == "every_other":
    return tuple(range(0, num_layers, 2))
  try:
    layers = tuple(int(i) for i in spec.split(","))
  except ValueError:
    raise ValueError(f"config.student.init={init!r}: {spec!r} is neither 'every_other' nor a "
                     "comma-separated list of layer indices") from None
  bad = [i for i in layers if not 0 <= i < num_layers]
  if bad or len(set(layers)) != len(layers):
    raise ValueError(f"config.student.init={init!r}: layer indices must be distinct and in "
                     f"[0, {num_layers}) for a {num_layers}-layer teacher")
  return layers


def select_layers(params, cfg: LlamaConfig, layers) -> tuple:
  """(params, config) of the model made of the teacher's decoder `layers` (in this order),
  with every other weight (embeddings, final norm, LM head) shared as it is."""
  layers = tuple(layers)
  backbone = dict(params["model"])
  if cfg.scan_layers:
    index = np.asarray(layers)
    backbone["layers"] = jax.tree.map(lambda x: x[index], backbone["layers"])
  else:
    kept = {f"layers_{new}": backbone[f"layers_{old}"] for new, old in enumerate(layers)}
    backbone = {k: v for k, v in backbone.items() if not k.startswith("layers_")} | kept
  return {**params, "model": backbone}, cfg.replace(num_hidden_layers=len(layers))


def build_student(teacher: str, init: str, out_dir) -> Path:
  """Writes the student of `teacher` (name_or_path) for `init` (see `parse_layers`) as an HF
  directory at `out_dir`, tokenizer included; reuses it when it already holds this student."""
  from jaxpost import hf  # hf imports the model modules: imported here, no import cycle
  out = Path(out_dir)
  teacher_dir = hf.resolve_model_dir(teacher)
  layers = parse_layers(init, hf.read_hf_config(teacher_dir)["num_hidden_layers"])
  marker = {"teacher": str(teacher_dir), "layers": list(layers)}
  if (out / MARKER).exists():
    if json.loads((out / MARKER).read_text()) == marker:
      return out
    raise FileExistsError(f"{out} holds another student ({out / MARKER}); remove it or choose "
                          "another directory")
  teacher_lm = hf.load_model(teacher, scan_layers=True)
  params, cfg = select_layers(teacher_lm.params, teacher_lm.config, layers)
  student = dataclasses.replace(teacher_lm, model=hf.build_module(cfg), params=params, config=cfg,
                                source=f"{teacher}[{','.join(map(str, layers))}]")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
  hf.save_model(student, str(tmp))
  (tmp / MARKER).write_text(json.dumps(marker))
  if out.exists():  # an empty or partial directory from an interrupted build
    shutil.rmtree(out)
  tmp.rename(out)
  return out
