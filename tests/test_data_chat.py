"""Chat templates and loss masks: masked tokens decode to exactly the assistant turns."""

import numpy as np
import pytest

from jaxpost.data.chat import ChatTokenizer, Limits, tokenize_example, truncate_prompted
from jaxpost.data.formats import DataError
from jaxpost.hf import load_tokenizer, resolve_model_dir

U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
S = lambda c: {"role": "system", "content": c}

LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
          "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")
CHATML_SYSTEM = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
                 "assistant.<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>"
                 "{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
           "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
           "{{ m['content'] + eos_token }}{% else %}{{ raise_exception('user/assistant only') }}"
           "{% endif %}{% endfor %}")
PLAIN = ("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:\n{% endif %}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CONVO = [U("Hi there"), A("Hello! How can I help?"), U("What is 2+2?"), A("2 + 2 = 4."),
         U("Thanks.\nBye"), A("Goodbye,\nsee you!")]
CONTENTS = [m["content"] for m in CONVO if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def llama_tok():
  t = load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))
  t.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
  return t


def _runs(mask):
  """[start, end) of each contiguous run of ones."""
  edges = np.diff(np.concatenate([[0], mask, [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


@pytest.mark.parametrize("template,eot,renders_exactly", [
    (None, "<|im_end|>", True),  # the bundled SmolLM2 template
    (LLAMA3, "<|eot_id|>", True),
    (CHATML_SYSTEM, "<|im_end|>", True),
    (MISTRAL, "<|im_end|>", True),  # eos_token of this tokenizer
    (PLAIN, "\n<|im_end|>", False),  # no end-of-turn token: EOS appended to each turn
], ids=["smollm2", "llama3", "chatml_system", "mistral", "plain_no_eot"])
@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_masks_decode_to_assistant_turns(tok, llama_tok, template, eot, renders_exactly,
                                         train_on):
  t = llama_tok if template == LLAMA3 else tok
  ct = ChatTokenizer(t, template)
  rec = tokenize_example(ct, {"messages": CONVO}, "sft", Limits(max_length=4096), train_on)
  ids, mask = rec["ids"], rec["mask"]
  expected = CONTENTS if train_on == "all_assistant" else CONTENTS[-1:]
  runs = _runs(mask)
  assert [t.decode(ids[a:b]) for a, b in runs] == [c + eot for c in expected]
  assert t.decode(ids[mask == 1]) == "".join(c + eot for c in expected)
  if renders_exactly:  # the sequence is the template's render, untouched
    assert t.decode(ids) == ct.render(CONVO)


def test_prompt_completion_masks(tok):
  ct = ChatTokenizer(tok)
  ex = {"prompt": [U("Sky color?")], "completion": [A("Blue.")]}
  rec = tokenize_example(ct, ex, "sft", Limits(max_length=512))
  assert tok.decode(rec["ids"][rec["mask"] == 1]) == "Blue.<|im_end|>"
  prompt_ids = tok.apply_chat_template([U("Sky color?")], add_generation_prompt=True)["input_ids"]
  np.testing.assert_array_equal(rec["ids"][:len(prompt_ids)], prompt_ids)
  std = tokenize_example(ct, {"prompt": "The sky is", "completion": " blue."}, "sft",
                         Limits(max_length=512))
  assert tok.decode(std["ids"][std["mask"] == 1]) == " blue.<|im_end|>"  # EOS appended
  assert tok.decode(std["ids"]) == "The sky is blue.<|im_end|>"
  text = tokenize_example(ct, {"text": "Once upon a time."}, "sft", Limits(max_length=512))
  assert text["ids"][-1] == tok.eos_token_id and text["mask"][0] == 0 and text["mask"][1:].all()


def test_preference_tokens_as_trl(tok):
  """prompt = render(prompt, generation prompt); completion = render(prompt+c) - prompt."""
  ct = ChatTokenizer(tok)
  ex = {"prompt": [U("2+2?")], "chosen": [A("4")], "rejected": [A("5, I think")], "margin": 1.5}
  rec = tokenize_example(ct, ex, "preference", Limits(max_length=512))
  p = tok.apply_chat_template(ex["prompt"], add_generation_prompt=True)["input_ids"]
  for side in ("chosen", "rejected"):
    full = tok.apply_chat_template(ex["prompt"] + ex[side])["input_ids"]
    np.testing.assert_array_equal(rec[f"{side}_ids"], full)
    np.testing.assert_array_equal(rec[f"{side}_mask"], [0] * len(p) + [1] * (len(full) - len(p)))
  assert rec["margin"] == np.float32(1.5)
  unp = tokenize_example(ct, {"prompt": "Q:", "completion": " A", "label": 0}, "unpaired",
                         Limits(max_length=512))
  assert tok.decode(unp["ids"][unp["mask"] == 1]) == " A<|im_end|>" and unp["label"] == 0


def test_system_prompt_and_template_file(tok, tmp_path):
  path = tmp_path / "t.jinja"
  path.write_text(CHATML_SYSTEM)
  ct = ChatTokenizer(tok, str(path), system_prompt="Be brief.")
  text = ct.render([U("hi")])
  assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "helpful" not in text
  assert ChatTokenizer(tok, None, "Be brief.").render([S("Own."), U("hi")]).count("system") == 1
  with pytest.raises(FileNotFoundError, match="neither a Jinja template nor an existing file"):
    ChatTokenizer(tok, str(tmp_path / "missing.jinja"))
  rec = tokenize_example(ct, {"prompt": [U("hi")]}, "prompt", Limits(max_length=64))
  assert tok.decode(rec["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_template_breaking_prefix_property(tok):
  """A template that rewrites earlier turns (drops past reasoning) cannot give masks."""
  tpl = ("{% for m in messages %}{% set c = m['content'] %}{% if m['role'] == 'assistant' and "
         "not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}<|im_start|>"
         "{{ m['role'] }}\n{{ c }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
         "<|im_start|>assistant\n{% endif %}")
  convo = [U("a"), A("<think>hmm</think>b"), U("c"), A("d")]
  with pytest.raises(DataError, match="not a prefix of the longer conversation") as info:
    tokenize_example(ChatTokenizer(tok, tpl), {"messages": convo}, "sft", Limits(max_length=99))
  assert info.value.reason == "template_not_incremental"


@pytest.mark.parametrize("lim,prompt,comps", [
    # prompt cut first, down to max(max_length - longest, max_length // 2)
    (Limits(12, truncation_mode="keep_end"), list(range(4, 11)), [[0] * 5, [1] * 3]),
    (Limits(12, truncation_mode="keep_start"), list(range(1, 8)), [[0] * 5, [1] * 3]),
    # then the completions
    (Limits(8, truncation_mode="keep_end"), list(range(7, 11)), [[0] * 4, [1] * 3]),
    (Limits(20, max_prompt_length=3, max_completion_length=4), [8, 9, 10], [[0] * 4, [1] * 3]),
])
def test_truncate_prompted(lim, prompt, comps):
  p, c, truncated = truncate_prompted(list(range(1, 11)), [[0] * 5, [1] * 3], lim)
  assert (p, c, truncated) == (prompt, comps, True)
  assert truncate_prompted([1, 2], [[3]], lim) == ([1, 2], [[3]], False)


def test_truncation_errors_and_sequences(tok):
  with pytest.raises(DataError, match="no room for a completion"):
    truncate_prompted(list(range(15)), [[0, 0]], Limits(10, max_prompt_length=20))
  ct = ChatTokenizer(tok)
  full = tokenize_example(ct, {"messages": CONVO}, "sft", Limits(4096))
  end = tokenize_example(ct, {"messages": CONVO}, "sft", Limits(40, truncation_mode="keep_end"))
  np.testing.assert_array_equal(end["ids"], full["ids"][-40:])
  assert end["truncated"] and tok.decode(end["ids"][end["mask"] == 1]).endswith("see you!<|im_end|>")
  with pytest.raises(DataError) as info:  # last turn cut away -> nothing to train
    tokenize_example(ct, {"messages": CONVO}, "sft", Limits(40, truncation_mode="keep_start"),
                     "last_assistant")
  assert info.value.reason == "no_trainable_tokens"
  with pytest.raises(DataError, match="prompt has"):
    tokenize_example(ct, {"prompt": "word " * 50}, "prompt", Limits(64, max_prompt_length=8))


@pytest.mark.parametrize("example", [
    {"messages": CONVO},
    {"prompt": [U("What is 2+2?")], "completion": [A("4")]},
    {"prompt": "What is 2+2?", "completion": " 4"},
], ids=["messages", "conversational_prompt_completion", "standard_prompt_completion"])
def test_train_on_all_trains_every_token_of_the_same_ids(tok, example):
  ct = ChatTokenizer(tok)
  lim = Limits(max_length=256)
  assistant = tokenize_example(ct, example, "sft", lim, "all_assistant")
  everything = tokenize_example(ct, example, "sft", lim, "all")
  np.testing.assert_array_equal(everything["ids"], assistant["ids"])
  assert everything["mask"].tolist() == [0] + [1] * (len(everything["ids"]) - 1)
  assert 0 < assistant["mask"].sum() < everything["mask"].sum()
  with pytest.raises(ValueError, match=r"data.train_on='everything'; choose one of"):
    tokenize_example(ct, example, "sft", lim, "everything")
