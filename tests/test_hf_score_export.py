"""A reward model exported by jaxpost scores the same in transformers: the exported pad token
never occurs in a row, so `*ForSequenceClassification` (rightmost non-pad token) pools where
jaxpost reads its score (last attention-mask token), also for rows that end in EOS."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxpost.data import ChatTokenizer, Limits, tokenize_example
from jaxpost.hf import (LoadedModel, build_module, load_tokenizer, read_hf_config, save_model,
                        score_tokenizer)
from jaxpost.models.config import LlamaConfig
from jaxpost.models.heads import last_token_scores
from jaxpost.models.llama import init_params
from tests.conftest import word_tokenizer

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
ROWS = [  # standard rows end in EOS; conversational ones in the template's "<|im_end|>\n"
    {"prompt": "What is 2+3?", "chosen": " 5", "rejected": " 6, I think"},
    {"prompt": "Name a colour.", "chosen": " Blue.<|im_end|>", "rejected": " Dog"},
    {"prompt": [{"role": "user", "content": "Say hi"}],
     "chosen": [{"role": "assistant", "content": "Hi!"}],
     "rejected": [{"role": "assistant", "content": "No, I will not say that word."}]},
]


@pytest.fixture(scope="module")
def score_model(bundled_dir):
  """A random tiny score model on the bundled tokenizer (pad = EOS = <|im_end|>)."""
  cfg = LlamaConfig.from_hf({**read_hf_config(bundled_dir), **TINY})
  module = build_module(cfg, "score")
  params = jax.jit(lambda key: init_params(module, key))(jax.random.PRNGKey(0))
  params["score"]["kernel"] = params["score"]["kernel"] * 50  # scores of order 1
  return LoadedModel(module, params, load_tokenizer(bundled_dir), cfg, "score")


def _rows(tokenizer):
  """Token ids of every chosen and rejected sequence, as the reward-model data pipeline builds."""
  ct = ChatTokenizer(tokenizer)
  out = []
  for row in ROWS:
    rec = tokenize_example(ct, row, "preference", Limits(max_length=128))
    out += [rec["chosen_ids"].tolist(), rec["rejected_ids"].tolist()]
  return out


def _user_text(tokenizer, row, key):
  """The text a transformers user scores: prompt + completion (+ EOS), or the rendered chat."""
  if isinstance(row["prompt"], str):
    text = row["prompt"] + row[key]
    return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token
  return tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=False)


def test_exported_reward_model_scores_like_jaxpost(score_model, tmp_path):
  rows = _rows(score_model.tokenizer)
  eos = score_model.tokenizer.eos_token_id
  assert sum(r[-1] == eos for r in rows) == 4  # the standard rows end in EOS
  width = max(map(len, rows))  # jaxpost's batches: right padded with its pad id (= EOS here)
  ids = np.array([r + [eos] * (width - len(r)) for r in rows], np.int32)
  mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], np.int32)
  score = jax.jit(lambda p, i, m: last_token_scores(score_model.model.apply({"params": p}, i, m), m))
  ours = np.asarray(score(score_model.params, ids, mask))

  save_model(score_model, tmp_path / "rm")
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "rm")
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
  config = json.loads((tmp_path / "rm" / "config.json").read_text())
  assert config["pad_token_id"] == tok.pad_token_id == hf.config.pad_token_id != eos
  assert config["vocab_size"] == score_model.config.vocab_size and len(tok) <= config["vocab_size"]
  assert score_model.tokenizer.pad_token_id == eos  # the caller's tokenizer is left as it was

  texts = [_user_text(tok, row, key) for row in ROWS for key in ("chosen", "rejected")]
  assert [tok(t)["input_ids"] for t in texts] == rows
  for side in ("right", "left"):
    tok.padding_side = side
    batch = tok(texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
      theirs = hf(**batch).logits[:, 0].numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4, err_msg=side)
  with torch.no_grad():  # the score at the EOS differs from the one before it
    before_eos = hf(input_ids=torch.tensor([rows[0][:-1]])).logits[0, 0].item()
  assert abs(before_eos - ours[0]) > 1e-2


@pytest.mark.parametrize("specials,pad,unk,template,vocab_size,expect", [
    (["<s>", "</s>", "<pad>"], "<pad>", None, None, 8, "<pad>"),            # own pad is fine
    (["<s>", "</s>", "<unk>"], "</s>", "<unk>", None, 8, "<unk>"),          # pad = EOS: unk
    (["<s>", "</s>", "<unk>", "<|x|>", "<|right_pad|>"], "</s>", "<unk>", None, 8,
     "<|right_pad|>"),                                                       # named like a pad
    (["<s>", "</s>", "<|turn|>", "<|x|>"], "</s>", None, "{{ '<|turn|>' }}", 8, "<|x|>"),
    (["<s>", "</s>", "<|turn|>"], "</s>", None, "{{ '<|turn|>' }}", 8, "<|pad|>"),  # a new one
])
def test_score_pad_token_choice(specials, pad, unk, template, vocab_size, expect):
  tok = word_tokenizer(["a", "b"], specials, pad, unk, template)
  cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=8, intermediate_size=8,
                    num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                    eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
  out = score_tokenizer(tok, cfg)
  assert out.pad_token == expect and out.pad_token_id < vocab_size
  assert out.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
  assert tok.pad_token == pad


def test_score_pad_token_without_a_free_id_is_refused():
  tok = word_tokenizer(["a", "b"], ["<s>", "</s>"], "</s>")
  cfg = LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=8,
                    num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                    eos_token_id=tok.eos_token_id)
  with pytest.raises(ValueError, match="tokenizer.pad_token"):
    score_tokenizer(tok, cfg)
