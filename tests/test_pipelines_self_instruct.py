"""Self-Instruct and Evol-Instruct (jaxpost/pipelines/self_instruct.py): every filter on a crafted
bad case and a good one, the growing ROUGE-L pool with canned generations, and a tiny-model run
on the paper's 175 seed tasks whose rows the SFT loader reads."""

import itertools
import json
import os
from pathlib import Path

import pytest

import jaxpost
from jaxpost.data import data_defaults
from jaxpost.data.loader import build_loader
from jaxpost.data.rouge import rouge_l
from jaxpost.pipelines import common, self_instruct as si

# The paper's 175 seed tasks in ../shared/data next to the checkout (or $JAXPOST_SHARED_DATA).
SHARED = Path(os.environ.get("JAXPOST_SHARED_DATA",
                             Path(__file__).resolve().parents[2] / "shared" / "data"))
REAL_SEEDS = SHARED / "self_instruct_seed_tasks.jsonl"
GOOD = "Give three tips for keeping a small vegetable garden healthy."


@pytest.mark.parametrize("bad,reason", [
    ("Name a fruit.", "too_short"),
    (" ".join(["word"] * 151), "too_long"),
    ("Describe the image of a sunset over the sea.", "blacklisted"),
    ("Tell me how to go to the nearest station from here.", "blacklisted"),
    ("Write a program that sorts a list of numbers.", "write_a_program"),
    ("- List three kinds of clouds and their heights.", "leading_punctuation"),
    ("¿Cuál es la capital de Francia hoy?", "non_ascii"),
    ("Give three tips for keeping a small vegetable garden very healthy.", "similar"),
])
def test_each_instruction_filter_rejects_its_case(bad, reason):
  pool = si.RougePool([GOOD])
  assert si.Filters().reason(bad, pool) == reason
  assert si.Filters().reason("Explain how a bicycle gear system changes effort.", pool) is None
  assert si.Filters().reason("Name the planets of the solar system.", pool) is None  # "map" not
  # inside "name"; word boundaries only


def test_instance_filters_and_parsers():
  kept, counts = si.filter_instances([
      {"input": "", "output": ""}, {"input": "same", "output": "same"},
      {"input": "x", "output": "1"}, {"input": "x", "output": "1"}, {"input": "x", "output": "2"},
      {"input": "y", "output": "3"}])
  assert kept == [{"input": "x", "output": "1"}, {"input": "y", "output": "3"}]
  assert counts == {"empty_output": 1, "input_equals_output": 1, "duplicate_instance": 1,
                    "conflicting_output": 1, "kept_instance": 2}
  assert si.parse_instructions(" Sort the words.\n10. Name a color.\n11. Cut of", True) == [
      "Sort the words.", "Name a color."]
  assert si.parse_instances("Input: 2 + 2\nOutput: 4\nTask: next", False) == [
      {"input": "2 + 2", "output": "4"}]
  assert si.parse_instances(" just an answer", False) == [{"input": "", "output": "just an answer"}]
  assert si.parse_instances(" Positive\nInput: I loved it.\n\nClass label: Negative\nInput: Bad.",
                            True) == [{"input": "I loved it.", "output": "Positive"},
                                      {"input": "Bad.", "output": "Negative"}]
  assert si.parse_yes(" Yes") and not si.parse_yes(" No") and not si.parse_yes("garbled")
  prompt = si.instruction_prompt(["A task:", "Another   task"])
  assert prompt == "Come up with a series of tasks:\n1. A task\n2. Another task\n3."


@pytest.mark.parametrize("evolved,response,reason", [
    ("Sort the words.", "ok", "no_change"),
    ("Here is the Rewritten Prompt: sort the words backwards.", "ok", "copied_prompt_words"),
    ("Sort the words by their third letter.", "Sorry, I cannot do that.", "sorry"),
    ("Sort the words by their third letter.", "the a of ...", "empty_response"),
])
def test_evol_elimination(evolved, response, reason):
  assert si.eliminate("Sort the words.", evolved, response) == reason
  assert si.eliminate("Sort the words.", "Sort the words by their third letter.",
                      "Apple, banana, cherry.") is None


def test_seed_file_errors_name_the_line(tmp_path):
  bad = tmp_path / "seeds.jsonl"
  bad.write_text('{"instruction": "ok task here", "instances": [{"input": "", "output": "a"}]}\n'
                 '{"instruction": "", "instances": []}\n')
  with pytest.raises(common.PipelineError, match="seeds.jsonl line 2: needs a non-empty"):
    si.load_seed_tasks(bad)
  assert len(si.load_seed_tasks("")) >= 20  # the project's own set ships with the package


def tiny(workdir, **overrides):
  c = jaxpost.configs.get("self_instruct:tiny")
  c.workdir, c.pipeline.progress_bar = str(workdir), False
  for key, value in overrides.items():
    c[key] = value
  return c


def test_growing_pool_has_no_similar_pair(tmp_path, monkeypatch):
  """Canned continuations full of near-duplicates, within a step and across steps."""
  variants = ["Describe the water cycle for a young student in simple words.",
              "Describe the water cycle for a young student using simple words.",  # > 0.7
              "Suggest a name for a new coffee shop near the university campus.",
              "Suggest a good name for a new coffee shop near the university campus.",
              "Translate the sentence into French and explain the grammar used.",
              "List four ways to reduce household energy use in the winter months.",
              "List four ways to reduce household energy use in winter months."]
  calls = itertools.count()

  def canned(self, prompts, uid, **kw):
    if uid.endswith("/classify"):
      return [" No"] * len(prompts), ["stop"] * len(prompts)
    if uid.endswith("/instances"):
      return [f" Output: answer {i}" for i in range(len(prompts))], ["stop"] * len(prompts)
    k = next(calls)
    texts = [" " + "\n10. ".join(variants[(k + j) % 7:(k + j) % 7 + 3]) for j in range(len(prompts))]
    return texts, ["stop"] * len(prompts)
  monkeypatch.setattr(si._Run, "generate", canned)
  report = si.run(tiny(tmp_path, num_instructions=4, max_steps=6))
  rows = common.read_jsonl(tmp_path / "data.jsonl")
  kept = list(dict.fromkeys(r["instruction"] for r in rows))
  assert report["instructions"] == len(kept) == 4 and not report["stopped"] and report["counts"]["similar"] >= 2
  seeds = [s["instruction"] for s in si.load_seed_tasks("")]
  for a, b in itertools.combinations(kept + seeds, 2):
    assert rouge_l(a, b) <= 0.7, (a, b)
  assert all(set(r) == {"instruction", "input", "output"} for r in rows)


def test_evol_rounds_carry_failed_parents(tmp_path, monkeypatch):
  def canned(self, prompts, uid, **kw):
    if uid.endswith("/answers"):
      return ["A detailed answer." for _ in prompts], ["stop"] * len(prompts)
    if uid.startswith("m0/"):  # round 1: the first evolution of each unit fails (no change)
      return [p.split("Original prompt:\n", 1)[1].rsplit("\n\n", 1)[0] if i == 0 else
              f"Evolved {uid} {i} with an extra requirement." for i, p in enumerate(prompts)], \
          ["stop"] * len(prompts)
    return [f"Round two {uid} {i} asks for more steps." for i in range(len(prompts))], \
        ["stop"] * len(prompts)
  monkeypatch.setattr(si._Run, "generate", canned)
  report = si.run(tiny(tmp_path, mode="evol", chat_template=True))
  assert report["complete"] and report["counts"]["no_change"] == 1
  assert report["counts"]["evolved"] == 3 + 4 and report["rows"] == 7
  state = json.loads((tmp_path / "state.json").read_text())["units"]
  first = si.seed_prompt(si.load_seed_tasks("")[0])
  assert state["m0/u00000"]["info"]["next"][0] == first  # the failed parent evolves again
  assert sum(report["counts"].get(f"op/{o}", 0) for o in si.OPERATIONS) == 8


@pytest.mark.skipif(not REAL_SEEDS.exists(), reason="../shared/data seed tasks absent")
def test_real_seeds_tiny_model_rows_load_as_sft(tmp_path):
  c = tiny(tmp_path, seed_tasks=str(REAL_SEEDS), num_instructions=3)
  c.pipeline.batch_size = 2
  report = si.run(c)
  assert len(si.load_seed_tasks(REAL_SEEDS)) == 175
  assert report["complete"] and report["rows"] > 0
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  assert manifest["counts"]["kept_instruction"] == 3 and manifest["config"]["seed_tasks"]
  lm = common.load_generator(tiny(tmp_path).model, tmp_path)
  data = data_defaults()
  data.train, data.max_length, data.cache = str(tmp_path / "data.jsonl"), 256, False
  loader = build_loader(data, lm.tokenizer, "sft", batch_size=2)
  assert loader.summary["examples"] == report["rows"]
