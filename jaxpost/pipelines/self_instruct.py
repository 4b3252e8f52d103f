"""Self-Instruct (Wang et al. 2022) and Evol-Instruct (Xu et al. 2023): instruction data from a
model and a few seed tasks, written as Alpaca rows (instruction, input, output).

Self-Instruct, per step (one committed unit):
  1. prompts of 8 in-context instructions, "Come up with a series of tasks:" then a numbered list
     of 6 seed instructions and 2 instructions generated earlier (8 seeds while fewer than 2
     exist), shuffled; the model continues the list;
  2. the continuation is split into its numbered items (the last one dropped when generation hit
     the length limit, `drop_truncated`) and each candidate goes through the filters, in order:
       too_short / too_long  fewer than `filters.min_words` or more than `filters.max_words` words
       blacklisted           a word of `filters.blacklist` (image, graph, file, ...: tasks a
                             language model cannot do)
       write_a_program       starts with "Write a program"
       leading_punctuation   starts with punctuation;   non_ascii: starts with a non-ASCII char
       similar               ROUGE-L F > `filters.rouge_threshold` (0.7) against ANY instruction
                             in the pool (seeds + every instruction kept so far, this step's
                             earlier ones included: the pool grows one by one)
  3. classification identification: a few-shot yes/no prompt built from the seeds' labels;
  4. instances: input-first for other tasks (Task / Input / Output), output-first for
     classification (Task / Class label / Input), few-shot from seeds of the same type;
  5. instance filters: empty_output, input_equals_output, duplicate_instance (same input and
     output), conflicting_output (same input, another output), then one Alpaca row per instance.
It stops after `num_instructions` kept instructions (or `max_steps`, `pipeline.max_rows`,
`pipeline.max_seconds`).

Evol-Instruct (WizardLM), `mode="evol"`: the seed instructions (with their first input) evolve
for `evol.rounds` rounds; each round rewrites every instruction of the pool with one operation
drawn from `evol.operations` (in-depth: constraints, deepen, concretize, reasoning; in-breadth:
breadth), answers it, and eliminates failed evolutions (§3.3): no_change (the same text),
copied_prompt_words (it repeats the rewriting prompt's own words), sorry (the answer apologises in
under 80 words), empty_response (no word but stop words). A successful evolution becomes an Alpaca
row and replaces its parent in the pool; a failed one leaves the parent for the next round.

Prompts are plain text by default for Self-Instruct (the paper prompts a base LM to continue a
list; `chat_template=True` wraps them as a user turn) and chat turns for Evol-Instruct.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from jaxpost.data.rouge import RougePool, tokenize
from jaxpost.pipelines import common

SEED_TASKS = common.seed_tasks_path()
BLACKLIST = ("image", "images", "picture", "pictures", "graph", "graphs", "file", "files", "map",
             "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
TASKS_HEADER = "Come up with a series of tasks:\n"
CLASSIFY_HEADER = ("Can the following task be regarded as a classification task with finite "
                   "output labels?\n\n")
INPUT_FIRST_HEADER = ("Come up with examples for the following tasks. If a task needs no input, "
                      "write only its output.\n\n")
OUTPUT_FIRST_HEADER = ("Given a classification task and one of its class labels, write an "
                       "input that belongs to that label.\n\n")
MODES = ("self_instruct", "evol")


# ----------------------------------------------------------------------------- seed tasks


def load_seed_tasks(path) -> list[dict]:
  """The tasks of a seed_tasks.jsonl (the paper's format: one object per line with
  `instruction`, `instances` [{"input", "output"}], `is_classification`); a bad line fails
  naming the file and line."""
  path = Path(path or SEED_TASKS)
  if not path.exists():
    raise common.PipelineError(f"seed_tasks: no such file {path}")
  tasks = []
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    where = f"seed_tasks {path} line {number}"
    try:
      task = json.loads(line)
    except json.JSONDecodeError as err:
      raise common.PipelineError(f"{where}: invalid JSON ({err})") from None
    instances = task.get("instances") if isinstance(task, dict) else None
    if not isinstance(task, dict) or not isinstance(task.get("instruction"), str) or \
        not task["instruction"].strip():
      raise common.PipelineError(f"{where}: needs a non-empty string 'instruction'")
    if not isinstance(instances, list) or not instances or not all(
        isinstance(i, dict) and isinstance(i.get("input", ""), str) and
        isinstance(i.get("output"), str) for i in instances):
      raise common.PipelineError(f"{where}: 'instances' must be a non-empty list of "
                                 f"{{'input': str, 'output': str}}")
    tasks.append({"instruction": task["instruction"].strip(),
                  "instances": [{"input": i.get("input", ""), "output": i["output"]}
                                for i in instances],
                  "is_classification": bool(task.get("is_classification", False))})
  if not tasks:
    raise common.PipelineError(f"seed_tasks {path} has no tasks")
  return tasks


# ----------------------------------------------------------------------------- instructions


def _clean(instruction: str) -> str:
  return re.sub(r"\s+", " ", instruction).strip().rstrip(":")


def instruction_prompt(instructions: Sequence[str]) -> str:
  """The paper's instruction-generation prompt: a numbered list the model continues."""
  lines = [f"{i}. {_clean(t)}" for i, t in enumerate(instructions, 1)]
  return TASKS_HEADER + "\n".join(lines) + f"\n{len(instructions) + 1}."


def parse_instructions(text: str, truncated: bool) -> list[str]:
  """The instructions of a continuation of `instruction_prompt` (it starts inside item n + 1):
  numbered items, the last dropped when `truncated` (it may be cut mid-sentence)."""
  items = [_clean(t) for t in re.split(r"\n\s*\d+\s*[.)]\s*", "\n" + text.strip())]
  items = [t for t in items if t]
  return items[:-1] if truncated and items else items


@dataclasses.dataclass(frozen=True)
class Filters:
  """The paper's instruction filters (module docstring); `reason` names the first that fails."""
  min_words: int = 4
  max_words: int = 150
  rouge_threshold: float = 0.7
  blacklist: tuple = BLACKLIST

  @classmethod
  def of(cls, section) -> "Filters":
    return cls(int(section.min_words), int(section.max_words), float(section.rouge_threshold),
               tuple(section.blacklist))

  def reason(self, instruction: str, pool: Optional[RougePool] = None) -> Optional[str]:
    words = len(instruction.split())
    if words < self.min_words:
      return "too_short"
    if words > self.max_words:
      return "too_long"
    lower = instruction.lower()
    if any(re.search(rf"\b{re.escape(w)}\b", lower) for w in self.blacklist):
      return "blacklisted"
    if lower.startswith("write a program"):
      return "write_a_program"
    if instruction[0] in string.punctuation:
      return "leading_punctuation"
    if not instruction[0].isascii():
      return "non_ascii"
    if pool is not None and pool.max_score(instruction) > self.rouge_threshold:
      return "similar"
    return None


# ----------------------------------------------------------------------------- classification


def classification_prompt(instruction: str, seeds: Sequence[dict], shots: int = 6) -> str:
  """Few-shot "is it classification?" prompt: `shots` seeds, balanced yes / no."""
  yes = [s for s in seeds if s["is_classification"]][:shots // 2]
  no = [s for s in seeds if not s["is_classification"]][:shots - len(yes)]
  examples = [ex for pair in zip(no, yes) for ex in pair] + no[len(yes):] + yes[len(no):]
  body = "".join(f"Task: {_clean(s['instruction'])}\nIs it classification? "
                 f"{'Yes' if s['is_classification'] else 'No'}\n\n" for s in examples)
  return CLASSIFY_HEADER + body + f"Task: {_clean(instruction)}\nIs it classification?"


def parse_yes(text: str) -> bool:
  """True when the answer starts with "yes" (anything else, garbled text included, is no)."""
  return text.strip().lower().startswith("yes")


# ----------------------------------------------------------------------------- instances


def instance_prompt(instruction: str, classification: bool, seeds: Sequence[dict],
                    shots: int = 3) -> str:
  """Input-first (Task / Input / Output) or, for classification, output-first (Task / Class
  label / Input) instance generation, with `shots` seed tasks of the same type."""
  same = [s for s in seeds if s["is_classification"] == classification][:shots]
  if classification:
    body = "".join(f"Task: {_clean(s['instruction'])}\nClass label: {i['output']}\n"
                   f"Input: {i['input']}\n\n" for s in same for i in s["instances"][:1])
    return OUTPUT_FIRST_HEADER + body + f"Task: {_clean(instruction)}\nClass label:"
  body = "".join(f"Task: {_clean(s['instruction'])}\n"
                 + (f"Input: {i['input']}\n" if i["input"] else "")
                 + f"Output: {i['output']}\n\n" for s in same for i in s["instances"][:1])
  return INPUT_FIRST_HEADER + body + f"Task: {_clean(instruction)}\n"


def parse_instances(text: str, classification: bool) -> list[dict]:
  """{"input", "output"} instances from a continuation of `instance_prompt`."""
  text = text.split("\nTask:")[0]
  out = []
  if classification:  # the continuation starts right after "Class label:"
    for segment in text.split("Class label:"):
      label, _, inp = segment.partition("Input:")
      out.append({"input": inp.strip(), "output": label.strip()})
    return out
  if "Output:" not in text:
    return [{"input": "", "output": text.replace("Input:", "").strip()}]
  for segment in re.split(r"(?=Input:)", text):
    if "Output:" not in segment:
      continue
    inp, _, output = segment.partition("Output:")
    out.append({"input": inp.replace("Input:", "", 1).strip(), "output": output.strip()})
  return out


def filter_instances(instances: Sequence[dict]) -> tuple[list[dict], Counter]:
  """The instance filters (module docstring): (kept instances, counts per reason)."""
  kept, counts, outputs = [], Counter(), {}
  for inst in instances:
    inp, output = inst["input"].strip(), inst["output"].strip()
    if not output:
      reason = "empty_output"
    elif inp and inp == output:
      reason = "input_equals_output"
    elif inp in outputs:
      reason = "duplicate_instance" if outputs[inp] == output else "conflicting_output"
    else:
      reason = None
      outputs[inp] = output
      kept.append({"input": inp, "output": output})
    counts[reason or "kept_instance"] += 1
  return kept, counts


def alpaca_rows(instruction: str, instances: Sequence[dict]) -> list[dict]:
  return [{"instruction": instruction, "input": i["input"], "output": i["output"]}
          for i in instances]


# ----------------------------------------------------------------------------- Evol-Instruct

_IN_DEPTH = ("You rewrite prompts so that they are harder for an AI assistant to answer while a "
             "person can still understand and answer them. Keep any code, table or input of the "
             "original. Add at most 10 to 20 words. Write only the harder prompt.\n"
             "How to make it harder: {method}\n\nOriginal prompt:\n{instruction}\n\n"
             "Harder prompt:")
IN_DEPTH_METHODS = {
    "constraints": "add one more constraint or requirement.",
    "deepen": "ask about the topic in more depth and breadth.",
    "concretize": "replace general concepts with more specific ones.",
    "reasoning": "if a few simple steps solve it, ask explicitly for several steps of reasoning.",
}
_IN_BREADTH = ("You invent a new prompt for an AI assistant. It belongs to the same domain as the "
               "original prompt but is about something rarer, with a similar length and "
               "difficulty. Write only the new prompt.\n\nOriginal prompt:\n{instruction}\n\n"
               "New prompt:")
OPERATIONS = (*IN_DEPTH_METHODS, "breadth")
COPIED_WORDS = ("original prompt", "harder prompt", "new prompt", "given prompt",
                "rewritten prompt", "#rewritten prompt#", "#given prompt#", "#created prompt#")
STOP_WORDS = frozenset("a an the and or of to in on for is are was be it this that i you".split())


def evol_prompt(operation: str, instruction: str) -> str:
  if operation == "breadth":
    return _IN_BREADTH.format(instruction=instruction)
  return _IN_DEPTH.format(method=IN_DEPTH_METHODS[operation], instruction=instruction)


def eliminate(original: str, evolved: str, response: str) -> Optional[str]:
  """Why an evolution failed (WizardLM §3.3, module docstring), or None when it succeeded."""
  norm = lambda t: re.sub(r"\s+", " ", t).strip().lower()
  if not evolved.strip() or norm(evolved) == norm(original):
    return "no_change"
  if any(w in evolved.lower() for w in COPIED_WORDS):
    return "copied_prompt_words"
  if "sorry" in response.lower() and len(response.split()) < 80:
    return "sorry"
  if all(t in STOP_WORDS for t in tokenize(response)):
    return "empty_response"
  return None


def seed_prompt(task: dict) -> str:
  """A seed task as one instruction (its first instance's input appended)."""
  inp = task["instances"][0]["input"]
  return f"{task['instruction']}\n\n{inp}" if inp else task["instruction"]


# ----------------------------------------------------------------------------- the pipelines


class _Run:
  """What both pipelines share: config, store, budget, model, timings."""

  def __init__(self, config):
    from jaxpost.configs import self_instruct as recipe
    common.check_keys(config, recipe.get_config(), recipe.KEYS, "self_instruct")
    if config.mode not in MODES:
      raise common.PipelineError(f"config.mode must be one of {MODES}, got {config.mode!r}")
    self.config = config
    self.seeds = load_seed_tasks(config.seed_tasks)
    self.workdir = Path(config.workdir)
    self.store = common.UnitStore(self.workdir, config)
    self.budget = common.Budget.of(config)
    self.timings = Counter()
    self.lm = None
    self.stopped: Optional[str] = None

  def generate(self, prompts, uid, *, temperature=None, max_new_tokens=None, stop=()):
    """One completion per prompt (texts, finish reasons)."""
    if self.lm is None:
      self.lm = common.load_generator(self.config.model, self.workdir, seed=self.config.seed)
    start = time.perf_counter()
    out = common.sample(self.lm, prompts, 1, self.config.sampling,
                        common.unit_seed(self.config.seed, uid),
                        self.config.pipeline.generate_batch_size, temperature=temperature,
                        max_new_tokens=max_new_tokens, stop_strings=stop,
                        chat_template=True if self.config.chat_template else False)
    self.timings["generate"] += time.perf_counter() - start
    return out.texts, out.finish_reasons

  def finish(self, complete: bool, **extra) -> dict:
    self.store.export(self.workdir / common.DATA_FILE, self.store.units())
    if self.stopped:
      common.log.warning("stopped early: %s", self.stopped)
    manifest = common.write_manifest(
        self.workdir, self.config, self.config.model.name_or_path, self.store, complete,
        {**self.timings, "total": self.budget.elapsed()}, stopped=self.stopped, **extra)
    return {"complete": complete, "rows": manifest["rows"], "counts": manifest["counts"],
            "data": str(self.workdir / common.DATA_FILE), "stopped": self.stopped, **extra}


class SelfInstruct(_Run):
  """The Self-Instruct loop (module docstring); one unit per step."""

  def __init__(self, config):
    super().__init__(config)
    self.filters = Filters.of(config.filters)
    self.generated = [i for u in self.store.units() for i in self.store.info(u)["instructions"]]
    self.pool = RougePool([s["instruction"] for s in self.seeds] + self.generated)

  def _prompts(self, rng) -> list[str]:
    c = self.config
    seeds = [s["instruction"] for s in self.seeds]
    prompts = []
    for _ in range(c.pipeline.batch_size):
      n_gen = min(c.num_prompt_instructions - c.num_prompt_seeds, len(self.generated))
      picked = list(rng.choice(self.generated, n_gen, replace=False)) if n_gen else []
      picked += list(rng.choice(seeds, min(c.num_prompt_instructions - n_gen, len(seeds)),
                                replace=False))
      rng.shuffle(picked)
      prompts.append(instruction_prompt(picked))
    return prompts

  def _step(self, uid: str):
    c, counts = self.config, Counter()
    rng = np.random.default_rng(common.unit_seed(c.seed, uid + "/prompts"))
    texts, finish = self.generate(self._prompts(rng), uid)
    kept = []
    for text, reason in zip(texts, finish):
      cut = reason == "length" and c.drop_truncated
      for inst in parse_instructions(text, truncated=cut):
        if len(self.generated) + len(kept) >= c.num_instructions:
          break
        why = self.filters.reason(inst, self.pool)
        counts[why or "kept_instruction"] += 1
        if why is None:
          self.pool.add(inst)
          kept.append(inst)
    rows, flags = self._instances(kept, uid, counts)
    self.store.commit(uid, rows, counts, {"instructions": kept, "classification": flags})
    self.generated += kept

  def _instances(self, instructions, uid, counts) -> tuple[list[dict], list[bool]]:
    if not instructions:
      return [], []
    c = self.config
    answers, _ = self.generate([classification_prompt(i, self.seeds) for i in instructions],
                               uid + "/classify", temperature=0.0, max_new_tokens=3)
    flags = [parse_yes(a) for a in answers]
    counts["classification"] += sum(flags)
    texts, _ = self.generate([instance_prompt(i, f, self.seeds, c.instances.shots)
                              for i, f in zip(instructions, flags)], uid + "/instances",
                             temperature=c.instances.temperature,
                             max_new_tokens=c.instances.max_new_tokens, stop=("\nTask:",))
    rows = []
    for inst, flag, text in zip(instructions, flags, texts):
      kept, why = filter_instances(parse_instances(text, flag))
      counts.update(why)
      counts["no_valid_instance"] += not kept
      rows += alpaca_rows(inst, kept)
    return rows, flags

  def run(self) -> dict:
    c = self.config
    bar = common.progress(c.num_instructions, "instructions", c.pipeline.progress_bar,
                          len(self.generated))
    complete = True
    with bar:
      for step in range(c.max_steps):
        if len(self.generated) >= c.num_instructions:
          break
        uid = f"s{step:05d}"
        if self.store.done(uid):
          continue
        self.stopped = self.budget.stop_reason(self.store.row_count())
        if self.stopped:
          complete = False
          break
        before = len(self.generated)
        self._step(uid)
        bar.update(len(self.generated) - before)
    if complete and len(self.generated) < c.num_instructions:
      self.stopped = f"max_steps={c.max_steps} reached with {len(self.generated)} instructions"
    return self.finish(complete, instructions=len(self.generated))


class EvolInstruct(_Run):
  """Evol-Instruct rounds (module docstring); units are batches of one round's pool."""

  def _pool(self, m: int) -> list[str]:
    if m == 0:
      pool = [seed_prompt(s) for s in self.seeds]
      return pool[:self.config.evol.max_instructions or None]
    return [i for u in self.store.units(f"m{m - 1}/") for i in self.store.info(u)["next"]]

  def _unit(self, uid: str, batch: list[str]):
    c, counts = self.config, Counter()
    rng = np.random.default_rng(common.unit_seed(c.seed, uid + "/ops"))
    ops = [str(rng.choice(list(c.evol.operations))) for _ in batch]
    evolved, _ = self.generate([evol_prompt(o, i) for o, i in zip(ops, batch)], uid)
    evolved = [e.strip() for e in evolved]
    answers, _ = self.generate([e or i for e, i in zip(evolved, batch)], uid + "/answers",
                               max_new_tokens=c.evol.response_max_new_tokens)
    rows, nxt = [], []
    for op, inst, new, answer in zip(ops, batch, evolved, answers):
      why = eliminate(inst, new, answer)
      counts[f"op/{op}"] += 1
      counts[why or "evolved"] += 1
      if why is None:
        rows.append({"instruction": new, "input": "", "output": answer.strip()})
      nxt.append(inst if why else new)
    self.store.commit(uid, rows, counts, {"next": nxt})

  def run(self) -> dict:
    c = self.config
    for m in range(c.evol.rounds):
      units = common.batches(self._pool(m), c.pipeline.batch_size, f"m{m}/")
      self.stopped = common.run_units(self.store, self.budget, units, self._unit,
                                      f"evol round {m + 1}", c.pipeline.progress_bar)
      if self.stopped:
        return self.finish(False, rounds=m)
    return self.finish(True, rounds=c.evol.rounds)


def run(config) -> dict:
  """Runs (or continues) Self-Instruct, or Evol-Instruct with `config.mode="evol"`
  (configs/self_instruct.py); returns {"complete", "rows", "counts", "data", ...}."""
  return (EvolInstruct if config.mode == "evol" else SelfInstruct)(config).run()
