"""The bundled SmolLM2-135M-Instruct: conversion, parity with transformers, greedy decoding."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxpost
from jaxpost.models.llama import init_cache

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.",
           "Explain gravity to a child in two sentences.", "What is 12 + 30?"]


@pytest.fixture(scope="module")
def models(bundled_dir):
  lm = jaxpost.load_model("bundled:smollm2-135m-instruct")
  ref = transformers.AutoModelForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32)
  return lm, ref.eval()


def _chat_batch(tok, side, prompts=PROMPTS):
  tok.padding_side = side
  texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                   add_generation_prompt=True) for p in prompts]
  enc = tok(texts, return_tensors="np", padding=True)
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def test_converted_dir_is_a_normal_hf_dir(bundled_dir):
  tok = transformers.AutoTokenizer.from_pretrained(bundled_dir)
  assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
  ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
  assert tok.decode(ids).endswith("<|im_start|>assistant\n")
  assert tok.decode(tok("Hello world 2024")["input_ids"]) == "Hello world 2024"


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers(models, side):
  lm, ref = models
  ids, mask = _chat_batch(lm.tokenizer, side)
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    expected = ref(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long),
                   position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
  got = np.asarray(jax.jit(lm.model.apply)({"params": lm.params}, ids, attention_mask=mask))
  real = mask.astype(bool)
  assert np.abs(got - expected)[real].max() < 1e-3


def _greedy_kv(lm, ids, mask, new_tokens):
  """Greedy decoding through the model's KV-cache path (prefill + one token per call)."""
  b, p = ids.shape
  slots = p + new_tokens
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  kv_mask = np.concatenate([mask, np.zeros((b, new_tokens), np.int32)], axis=1)
  # The weights are an argument, not closed-over constants (which XLA would fold into the program).
  apply = jax.jit(lambda params, *a: lm.model.apply({"params": params}, *a, method="decode"))
  decode = lambda *a: apply(lm.params, *a)
  logits, cache = decode(ids, positions, kv_mask, init_cache(lm.config, b, slots), 0)
  token, pos = jnp.argmax(logits[:, -1], -1), positions[:, -1]
  out = []
  for t in range(new_tokens):
    out.append(np.asarray(token))
    pos = pos + 1
    kv_mask[:, p + t] = 1
    logits, cache = decode(token[:, None].astype(jnp.int32), pos[:, None], kv_mask, cache, p + t)
    token = jnp.argmax(logits[:, -1], -1)
  return np.stack(out, 1)


def test_greedy_continuation_is_token_identical(models):
  lm, ref = models
  ids, mask = _chat_batch(lm.tokenizer, "left", PROMPTS[1:3])  # two lengths: left padding
  ours = _greedy_kv(lm, ids, mask, 16)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # 2 OpenMP threads crawl when other processes share the 2 cores
  try:
    with torch.no_grad():
      theirs = ref.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                            attention_mask=torch.tensor(mask, dtype=torch.long),
                            do_sample=False, max_new_tokens=16, pad_token_id=2)
  finally:
    torch.set_num_threads(threads)
  theirs = theirs[:, ids.shape[1]:].numpy()
  eos = lm.tokenizer.eos_token_id
  for row_ours, row_theirs in zip(ours, theirs):  # HF stops a row at EOS; we compare up to it
    stop = list(row_theirs).index(eos) + 1 if eos in row_theirs else len(row_theirs)
    assert stop >= 8, "prompt too easy: the comparison would be too short"
    np.testing.assert_array_equal(row_ours[:stop], row_theirs[:stop])


def test_main_path_does_not_import_torch():
  code = ("import sys; sys.modules['torch'] = None\n"
          "import jaxpost, numpy as np\n"
          "lm = jaxpost.load_model('bundled:smollm2-135m-instruct')\n"
          "ids = np.array(lm.tokenizer('Hi there')['input_ids'], np.int32)[None]\n"
          "print(lm.model.apply({'params': lm.params}, ids).shape)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "(1, 2, 49152)" in out.stdout
