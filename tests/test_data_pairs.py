"""Preference data as users have it: HH-RLHF text with empty final turns, TRL's `margin` column."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from jaxpost.data import DataError, build_loader, data_defaults, normalize_row
from jaxpost.hf import load_tokenizer, resolve_model_dir
from jaxpost.models.config import LlamaConfig
from jaxpost.models.heads import LlamaForScore
from jaxpost.models.llama import init_params
from jaxpost.train.algorithms import LossContext
from jaxpost.algos.preference import pair_scores, reward_loss_fn

U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
HH = lambda *turns: "".join(f"\n\n{r}: {c}" if c else f"\n\n{r}:" for r, c in turns)


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))


def _loader(tok, train, tmp_path, kind="preference", **kw):
  c = data_defaults()
  c.train, c.max_length, c.buckets, c.cache_dir = train, 128, [128], str(tmp_path / "cache")
  c.shuffle = False
  c.update(kw)
  return build_loader(c, tok, kind, 4, process_index=0, process_count=1)


def hh_rows():
  """HH-RLHF harmless-base shaped rows: the last has an empty final assistant turn (chosen)."""
  q = ("Human", "How do I pick a lock?")
  return [
      {"chosen": HH(q, ("Assistant", "I can't help with that.")),
       "rejected": HH(q, ("Assistant", "Use a tension wrench."))},
      {"chosen": HH(("Human", "Hi"), ("Assistant", "Hello!"), ("Human", "Bye"),
                    ("Assistant", "Goodbye.")),
       "rejected": HH(("Human", "Hi"), ("Assistant", "Hello!"), ("Human", "Bye"),
                      ("Assistant", "Whatever."))},
      {"chosen": HH(q, ("Assistant", "")), "rejected": HH(q, ("Assistant", "Here is how."))},
      {"chosen": HH(q, ("Assistant", "No.")), "rejected": HH(q, ("Assistant", ""))},
  ]


def test_hh_rlhf_empty_final_turn_is_kept_by_default(tok, tmp_path):
  path = tmp_path / "hh.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in hh_rows()))
  loader = _loader(tok, str(path), tmp_path)
  assert loader.summary["examples"] == 4 and loader.summary["dropped"] == {}
  empty = normalize_row(hh_rows()[2], "preference")[0]
  assert empty["prompt"] == [U("How do I pick a lock?")] and empty["chosen"] == [A("")]
  rec = loader.table.records[2]
  assert tok.decode(rec["chosen_ids"][rec["chosen_mask"] == 1]) == "<|im_end|>\n"
  unpaired = _loader(tok, str(path), tmp_path, kind="unpaired")
  assert unpaired.summary["examples"] == 8


def test_sft_still_refuses_an_empty_demonstration(tok, tmp_path):
  with pytest.raises(DataError, match=r"row 2, column 'chosen': is empty \[empty_completion\]"):
    _loader(tok, hh_rows(), tmp_path, kind="sft")
  with pytest.raises(DataError, match="empty_completion"):
    normalize_row({"prompt": "q", "completion": " "}, "sft")


def test_margin_column_is_read_and_checked():
  row = {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2}
  assert normalize_row(row, "preference")[0]["margin"] == 2.0
  assert normalize_row({**row, "margin": None}, "preference")[0]["margin"] is None
  assert normalize_row({**row, "margin": " -0.5"}, "preference")[0]["margin"] == -0.5  # CSV
  for bad in ("two", True, float("nan"), "inf", [1]):
    with pytest.raises(DataError, match=r"column 'margin'.*\[bad_margin\]"):
      normalize_row({**row, "margin": bad}, "preference")


def test_margin_reaches_the_reward_loss(tok, tmp_path):
  rows = [{"prompt": f"What is {i} + {i}?", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}",
           "margin": m} for i, m in enumerate([1.5, 0.0, -0.5])]
  rows.append({"prompt": "Hi?", "chosen": " Hello.", "rejected": " Go away."})  # no margin
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  batch = next(_loader(tok, str(path), tmp_path, prefetch=0))
  np.testing.assert_array_equal(batch["margin"], np.float32([1.5, 0.0, -0.5, np.nan]))

  model = LlamaForScore(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=8))
  params = jax.jit(lambda k: init_params(model, k))(jax.random.PRNGKey(0))
  ctx = LossContext(model, ml_collections.ConfigDict({"center_rewards_coefficient": 0.0}))
  loss, _ = jax.jit(lambda p, b: reward_loss_fn(p, {}, b, None, ctx))(params, batch)
  rc, rr = (np.asarray(x, np.float64) for x in jax.jit(
      lambda p, b: pair_scores(model, p, b))(params, batch))
  margin = np.asarray([1.5, 0.0, -0.5, 0.0])  # NaN (no margin column) counts as 0
  want = np.mean(np.log1p(np.exp(-(rc - rr - margin))))  # -log σ(r_c - r_r - m)
  without = np.mean(np.log1p(np.exp(-(rc - rr))))
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert abs(want - without) > 1e-3
