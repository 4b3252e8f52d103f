"""Instruction templates and examples-proportional mixtures as training data keys
(data.templates, a source's `templates`, data.mixture / data.mixture_cap)."""

import collections
import json

import numpy as np
import pytest

from jaxpost.data import DataError, build_loader, data_defaults
from jaxpost.data.loader import Stream
from jaxpost.hf import load_tokenizer, resolve_model_dir

NLI = [{"name": "plain", "prompt": "Premise: {premise}\nHypothesis: {hypothesis}\nEntailed?"
                                   "{options_}", "completion": "{label}"},
       {"name": "inverted", "prompt": "Write a hypothesis that {premise} entails.",
        "completion": "{hypothesis}", "inverted": True}]
ROWS = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": ["yes", "no"][i % 2],
         "options": ["yes", "no"], "id": i} for i in range(12)]


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))


def _loader(tok, train, kind="sft", batch_size=4, **kw):
  c = data_defaults()
  c.train, c.max_length, c.buckets, c.cache = train, 128, [64, 128], False
  c.update(kw)
  return build_loader(c, tok, kind, batch_size, seed=0, process_index=0, process_count=1)


def _decoded_examples(tok, loader):
  """[(trained text, prompt text)] of every example of an SFT loader."""
  out = []
  for rec in loader.table.records:
    ids, mask = np.asarray(rec["ids"]), np.asarray(rec["mask"]).astype(bool)
    out.append((tok.decode(ids[mask]), tok.decode(ids[~mask])))
  return out


def test_a_source_with_templates_trains_on_the_rendered_rows(tok):
  loader = _loader(tok, [{"rows": ROWS, "templates": NLI, "shots": [0, 2], "name": "nli"}])
  texts = _decoded_examples(tok, loader)
  assert len(texts) == 12 and loader.summary["examples"] == 12
  plain = [(c, p) for c, p in texts if "Entailed?" in p]
  inverted = [(c, p) for c, p in texts if "entails." in p]
  assert plain and inverted and len(plain) + len(inverted) == 12
  assert any("OPTIONS:\n- yes\n- no" in p for _, p in plain)  # options drawn on and off
  assert any("OPTIONS" not in p for _, p in plain)
  for completion, prompt in inverted:  # the inverted template trains the hypothesis
    i = int(prompt.rsplit("that p", 1)[1].split(" ")[0])
    assert completion == f"h{i}<|im_end|>"
  for completion, prompt in plain:  # the answer follows the prompt's newline
    i = int(prompt.rsplit("Premise: p", 1)[1].split("\n")[0])
    assert prompt.endswith("\n") and completion == ROWS[i]["label"] + "<|im_end|>"
  few = [p for _, p in texts if p.count("Premise:") + p.count("Write a") == 3]
  assert few  # two-shot rows: two exemplars, each with its answer, then the row


def test_data_templates_apply_to_sources_without_their_own_and_chat(tok):
  own = [{"prompt": "Say {id}.", "completion": "{id}"}]
  train = [{"rows": ROWS[:4], "name": "a"},
           {"rows": ROWS[:4], "name": "b", "templates": own, "chat": True}]
  loader = _loader(tok, train, templates=[NLI[0]])
  texts = _decoded_examples(tok, loader)
  assert sum("Premise: p" in p for _, p in texts) == 4
  chat = [p for _, p in texts if "Say " in p]
  assert len(chat) == 4 and all("<|im_start|>user\nSay " in p for p in chat)


def test_prompt_rows_keep_their_other_columns_for_rewards(tok):
  rows = [{"question": f"{i} + 1", "answer": i + 1} for i in range(8)]
  loader = _loader(tok, [{"rows": rows, "templates": [
      {"prompt": "Compute {question}.", "completion": ""}]}], "prompt")
  ex = loader.example(3)
  assert ex["prompt"] == "Compute 3 + 1.\n" and ex["answer"] == 4 and ex["question"] == "3 + 1"


def test_a_row_missing_a_template_field_names_source_row_and_field(tok, tmp_path):
  path = tmp_path / "nli.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in ROWS[:3] + [{"premise": "p", "label": "no"}]))
  with pytest.raises(DataError, match=r"nli.jsonl line 4, column 'hypothesis': template 'plain' "
                                      r"needs field 'hypothesis'"):
    _loader(tok, [{"source": str(path), "templates": NLI[:1]}])
  loader = _loader(tok, [{"source": str(path), "templates": NLI, "shots": [2]}],
                   drop_bad_rows=True)
  assert loader.summary["dropped"] == {"missing_field": 1} and loader.summary["examples"] == 3
  with pytest.raises(ValueError, match=r"data source nli: templates\[0\]"):
    _loader(tok, [{"rows": ROWS, "name": "nli", "templates": [{"prompt": "x"}]}])


def test_two_source_examples_mixture_with_a_cap_gives_the_stated_proportions():
  sizes, cap = (20000, 2000), 5000
  ids = [np.arange(sizes[0]), np.arange(sizes[0], sum(sizes))]
  stream = Stream(ids, [1.0, 1.0], seed=0, shuffle=True, mixture="examples", cap=cap)
  assert stream.epoch_size == 7000 and stream.draws == [5000, 2000]
  drawn = np.asarray(stream.take(0, 10000))
  small = drawn >= sizes[0]
  assert abs(small.mean() - 2 / 7) < 0.01
  assert abs(small[:5000].mean() - 2 / 7) < 0.02  # interleaved, not blocked
  assert len(np.unique(drawn[small])) == 2000  # every small example, no repeat within an epoch
  assert len(np.unique(drawn[~small][:5000])) == 5000  # the big source subsampled, no repeats
  weighted = Stream(ids, [1.0, 3.0], seed=0, shuffle=True, mixture="examples", cap=cap)
  assert weighted.draws == [round(7000 * 5 / 11), round(7000 * 6 / 11)]
  uncapped = Stream(ids, [1.0, 1.0], seed=0, shuffle=True, mixture="examples")
  assert uncapped.draws == list(sizes)
  assert Stream(ids, [1.0, 1.0], 0, True).draws == [11000, 11000]  # weights: equal shares
  with pytest.raises(ValueError, match="data.mixture='flan'"):
    Stream(ids, [1.0, 1.0], 0, True, mixture="flan")


def test_examples_mixture_through_the_loader(tok):
  big = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": "yes"} for i in range(60)]
  small = [{"question": f"q{i}", "answer": "a"} for i in range(10)]
  train = [{"rows": big, "templates": NLI[:1], "name": "big"},
           {"rows": small, "templates": [{"prompt": "{question}", "completion": "{answer}"}],
            "name": "small"}]
  loader = _loader(tok, train, "prompt", batch_size=10, mixture="examples", mixture_cap=20)
  seen = np.concatenate([b["row"] for b in [next(loader) for _ in range(3)]])  # one epoch
  loader.close()
  counts = collections.Counter("small" if r >= 60 else "big" for r in seen)
  assert counts == {"big": 20, "small": 10} and loader.summary["epoch_draws"] == counts


def test_command_line_literals_and_repeated_sources():
  from jaxpost.data.sources import parse_sources
  specs = parse_sources('[{"source": "builtin:arithmetic", "templates": [{"prompt": "{a}", '
                        '"completion": "{b}"}], "chat": true}, "builtin:arithmetic"]')
  assert [s.name for s in specs] == ["builtin:arithmetic", "builtin:arithmetic#2"]
  assert specs[0].chat is True and specs[0].templates[0]["prompt"] == "{a}"
  assert parse_sources("[{'rows': [{'prompt': 'x'}], 'weight': 2}]")[0].weight == 2
  with pytest.raises(ValueError, match=r"data.train: .* neither JSON nor a Python literal"):
    parse_sources('[{"source": ')


def test_a_row_that_is_not_a_dict_is_a_bad_row(tok):
  loader = _loader(tok, [{"rows": ROWS[:4] + ["just a string"], "templates": NLI[:1]}],
                   drop_bad_rows=True)
  assert loader.summary["dropped"] == {"bad_row": 1} and loader.summary["examples"] == 4
