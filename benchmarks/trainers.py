"""One training benchmark in this process: jaxpost or TRL on the same pre-tokenised batches.

Batches are built once (in the parent) with jaxpost's loader, one length bucket so every batch
is [B, T], and stacked as numpy arrays {field: [steps, B, T]}. Chat batches (`chat_batches`:
completion-heavy conversational rows) keep the loader's default buckets instead, so each step
has its own T (`bucket_length` [steps]; the stacked arrays are padded to the longest), and TRL
pads each batch to its longest row (its default): each side pads as a user's run would. `run_jaxpost` trains on them
through `jaxpost.train(config, train_loader=...)`; `run_trl` hands TRL the same token ids
(`trl_rows`), records what TRL's collator feeds the model and raises unless every step's
input ids, attention mask and loss mask equal jaxpost's (`check_same_tokens`).

Kinds: "sft" (SFTTrainer, completion-only loss), "rm" (RewardTrainer, Bradley–Terry on the
scalar head at the last real token), "dpo" (DPOTrainer, sigmoid loss, reference = the initial
policy, or the adapters switched off with LoRA). Nothing here imports jax or jaxpost at module
level, so a TRL child's peak RSS is torch's alone.
"""

from __future__ import annotations

import jaxpost.configs
import json
import tempfile
from pathlib import Path

import numpy as np

MODEL = "bundled:smollm2-135m-instruct"
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECIPES = {"sft": "sft", "rm": "rm", "dpo": "dpo",  # kind -> configs/<recipe>.py
           "gkd": "distill:gkd"}
# configs/dpo.py's main job is RPO (+ the chosen NLL); the benchmarks time TRL's sigmoid DPO.
RECIPE_OVERRIDES = {"dpo": {"sft_weight": 0.0}}


# ------------------------------------------------------------------------------ batches

def loader_batches(data_overrides: dict, kind: str, length: int, batch_size: int,
                   steps: int) -> dict:
  """`steps` batches of jaxpost's loader (shuffle off, one bucket T=length unless
  `data_overrides` sets buckets), stacked; when it sets buckets the [B, T_i] batches are padded
  to the longest T_i and `bucket_length` [steps] keeps each T_i. Pairs are unshared (TRL's
  layout) unless `data_overrides` sets data.prefix_sharing."""
  from jaxpost.data.config import data_defaults
  from jaxpost.data.loader import build_loader
  from jaxpost.hf import load_tokenizer, resolve_model_dir
  data = data_defaults()
  data.update({"max_length": length, "buckets": (length,), "shuffle": False, "prefetch": 0,
               "prefix_sharing": False, **data_overrides})
  loader = build_loader(data, load_tokenizer(resolve_model_dir(MODEL)), kind, batch_size)
  if loader.summary["dropped"]:
    raise RuntimeError(f"benchmark rows must fit {length} tokens: {loader.summary}")
  batches = [next(loader) for _ in range(steps)]
  loader.close()
  if "buckets" not in data_overrides:
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}
  widths = [b[next(k for k in b if k.endswith("input_ids"))].shape[1] for b in batches]
  pad = lambda k, v: v if v.ndim == 1 else np.pad(
      v, ((0, 0), (0, max(widths) - v.shape[1])),
      constant_values=loader.pad_id if k.endswith("input_ids") else 0)
  return {**{k: np.stack([pad(k, b[k]) for b in batches]) for k in batches[0]},
          "bucket_length": np.asarray(widths)}


def sft_batches(length: int, batch_size: int, steps: int) -> dict:
  """Built-in arithmetic prompt/completion rows (truncated to `length` where longer)."""
  return loader_batches({"train": "builtin:arithmetic"}, "sft", length, batch_size, steps)


def filled_rows(ct, length: int, count: int) -> list[dict]:
  """`count` arithmetic preference rows, each prompt preceded by solved examples (user question,
  assistant's concise right answer) for as long as prompt + longer completion stays <= length,
  so the real tokens scale with `length`."""
  from jaxpost.data.tasks import task_rows
  rows = task_rows("arithmetic", "train", "preference")
  shots, out = rows[count:], []
  for row in rows[:count]:
    history = []
    for shot in shots:
      longer = history + shot["prompt"] + shot["chosen"]
      prompt, comps = ct.completions(longer + row["prompt"], [row["chosen"], row["rejected"]])
      if len(prompt) + max(map(len, comps)) > length:
        break
      history = longer
    out.append({**row, "prompt": history + row["prompt"]})
  return out


def preference_rows(length: int, count: int) -> list[dict]:
  """`filled_rows` with the bundled model's chat template."""
  from jaxpost.data.chat import ChatTokenizer
  from jaxpost.hf import load_tokenizer, resolve_model_dir
  return filled_rows(ChatTokenizer(load_tokenizer(resolve_model_dir(MODEL))), length, count)


def preference_batches(length: int, batch_size: int, steps: int) -> dict:
  """Preference pairs filling `length` (see `filled_rows`), never truncated."""
  rows = preference_rows(length, steps * batch_size)
  batches = loader_batches({"train": rows}, "preference", length, batch_size, steps)
  if batches["chosen_attention_mask"].sum(-1).max() > length:
    raise RuntimeError(f"preference rows longer than {length} tokens")
  return batches


WORDS = ("the river light stone garden window morning quiet paper green music table city road "
         "winter summer answer simple small large bright cold warm people friend house water "
         "story letter market bread field forest mountain cloud rain wind open close early late "
         "write read learn teach build travel cook plant share help").split()
CHAT_LENGTHS = {"prompt": 5, "chosen": 43, "rejected": 32}  # words; +-25 % per row


def chat_rows(count: int, seed: int = 0) -> list[dict]:
  """`count` completion-heavy conversational preference rows: a short user turn (~30 tokens with
  the bundled template's system prompt), chosen ~45 and rejected ~35 tokens (an assistant turn
  of CHAT_LENGTHS words, each row's lengths drawn within +-25 %) - the shape of chat preference
  data, where completions, not prompts, hold most tokens."""
  rng = np.random.default_rng(seed)

  def text(key):
    n = CHAT_LENGTHS[key]
    words = rng.choice(WORDS, size=int(rng.integers(n - n // 4, n + n // 4 + 1)))
    return " ".join(words).capitalize() + "."
  turn = lambda role, key: [{"role": role, "content": text(key)}]
  return [{"prompt": turn("user", "prompt"), "chosen": turn("assistant", "chosen"),
           "rejected": turn("assistant", "rejected")} for _ in range(count)]


def chat_batches(kind: str, length: int, batch_size: int, steps: int) -> dict:
  """`chat_rows` batches for `kind` (sft: prompt + chosen as the completion; rm / dpo: pairs)
  with jaxpost's default buckets up to `length`."""
  rows = chat_rows(steps * batch_size)
  if kind == "sft":
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
  loader_kind = "sft" if kind == "sft" else "preference"
  return loader_batches({"train": rows, "buckets": None}, loader_kind, length, batch_size, steps)


def step_batch(batches: dict, step: int) -> dict:
  """Step `step`'s batch, cut to its own bucket length when the batches carry one."""
  out = {k: v[step] for k, v in batches.items() if k != "bucket_length"}
  if "bucket_length" in batches:
    width = int(batches["bucket_length"][step])
    out = {k: v if v.ndim == 1 else v[:, :width] for k, v in out.items()}
  return out


def real_tokens_per_step(batches: dict) -> float:
  masks = [v for k, v in batches.items() if k.endswith("attention_mask")]
  return float(sum(m.sum() for m in masks)) / len(masks[0])


# ------------------------------------------------------------------------------ jaxpost

def jaxpost_config(kind: str, workdir: str, steps: int, batch_size: int, length: int,
                   lr: float, overrides: dict | None = None):
  """configs/<recipe>.py for `kind`, set up for a timed run: log every step, no eval, report,
  checkpoint or export, cosine schedule without warm-up."""
  c = jaxpost.configs.get(RECIPES[kind])
  c.update_from_flattened_dict({
      "workdir": workdir, "max_steps": steps, "batch_size": batch_size, "log_every": 1,
      "eval_at_start": False, "data.eval": None, "report.task": "", "export_hf": "",
      "data.max_length": length, "data.buckets": (length,), "checkpoint.every": -1,
      "metrics.tensorboard": False, "metrics.progress_bar": False,
      "optimizer.learning_rate": lr, "optimizer.warmup_steps": 0,
      **RECIPE_OVERRIDES.get(kind, {}), **(overrides or {})})
  return c


def run_jaxpost(config, batches: dict) -> dict:
  """Trains on `batches` in order; step times from metrics.jsonl (logged every step)."""
  records = train_records(config, batches)
  return {"step_times": [r["step_time"] for r in records[1:]],
          "first_step": records[0]["compile_time"], "check": records[0]["loss"],
          "last_loss": records[-1]["loss"]}


def train_records(config, batches: dict) -> list[dict]:
  """`jaxpost.train(config)` on `batches` in order, in a temporary workdir; its metrics
  records (the first holds compile_time, the rest step_time)."""
  import jaxpost
  steps = [step_batch(batches, i) for i in range(config.max_steps)]
  with tempfile.TemporaryDirectory() as workdir:
    config.workdir = workdir
    jaxpost.train(config, train_loader=iter(steps))
    return [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]


# ------------------------------------------------------------------------------ TRL

def trl_rows(kind: str, batches: dict) -> list[dict]:
  """TRL's pre-tokenised rows from the jaxpost batches, in order (real tokens only).

  sft: input_ids + completion_mask (= loss_mask); rm: chosen_ids / rejected_ids (full
  sequences); dpo: prompt_ids (what precedes the first trainable token, shared by both sides)
  + chosen_ids / rejected_ids (the rest)."""
  flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in batches.items() if k != "bucket_length"}
  real = lambda prefix, i: flat[f"{prefix}input_ids"][i][: flat[f"{prefix}attention_mask"][i].sum()]
  rows = []
  for i in range(len(next(iter(flat.values())))):
    if kind == "sft":
      n = flat["attention_mask"][i].sum()
      rows.append({"input_ids": real("", i).tolist(),
                   "completion_mask": flat["loss_mask"][i][:n].tolist()})
    elif kind == "rm":
      rows.append({"chosen_ids": real("chosen_", i).tolist(),
                   "rejected_ids": real("rejected_", i).tolist()})
    else:
      rows.append(_dpo_row(i, flat, real))
  return rows


def _dpo_row(i: int, flat: dict, real) -> dict:
  sides = {}
  for side in ("chosen", "rejected"):
    ids, start = real(f"{side}_", i).tolist(), int(np.argmax(flat[f"{side}_loss_mask"][i]))
    sides[side] = (ids[:start], ids[start:])
  if sides["chosen"][0] != sides["rejected"][0]:
    raise RuntimeError(f"pair {i}: chosen and rejected prompts differ")
  return {"prompt_ids": sides["chosen"][0], "chosen_ids": sides["chosen"][1],
          "rejected_ids": sides["rejected"][1]}


def expected_model_inputs(kind: str, batches: dict, step: int) -> dict:
  """What the model should see at `step`: [R, T] ids, attention mask and loss mask (None for
  rm), chosen rows before rejected rows for pairs (TRL's layout)."""
  batch = step_batch(batches, step)
  if kind == "sft":
    return {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
  both = lambda f: np.concatenate([batch[f"chosen_{f}"], batch[f"rejected_{f}"]])
  return {"input_ids": both("input_ids"), "attention_mask": both("attention_mask"),
          "loss_mask": None if kind == "rm" else both("loss_mask")}


def check_same_tokens(kind: str, batches: dict, seen: list, steps: int):
  """Raises unless TRL's collated batches equal jaxpost's at every step (pads excepted)."""
  if len(seen) < steps:
    raise RuntimeError(f"TRL collated {len(seen)} batches, expected {steps}")
  for step in range(steps):
    want, got = expected_model_inputs(kind, batches, step), _loss_mask_of(seen[step])
    mask = got["attention_mask"]
    if "bucket_length" in batches:  # TRL pads to the longest row, jaxpost to its bucket
      want = _cut_padding(want, mask.shape[1])
    same = (mask.shape == want["attention_mask"].shape
            and (mask == want["attention_mask"]).all()
            and (got["input_ids"][mask == 1] == want["input_ids"][mask == 1]).all()
            and (want["loss_mask"] is None or (got["loss_mask"] == want["loss_mask"]).all()))
    if not same:
      raise RuntimeError(f"{kind} step {step + 1}: TRL's batch differs from jaxpost's")


def _cut_padding(fields: dict, width: int) -> dict:
  """`fields` [R, T] cut to `width` columns (unchanged where the cut would drop real tokens,
  so the comparison fails)."""
  if fields["attention_mask"][:, width:].any():
    return fields
  return {k: None if v is None else v[:, :width] for k, v in fields.items()}


def _loss_mask_of(batch: dict) -> dict:
  """numpy ids / attention mask and the trained-token mask of a TRL batch (DPO's
  completion_mask, SFT's labels != -100; None for reward batches)."""
  out = {k: batch[k].numpy() for k in ("input_ids", "attention_mask")}
  out["loss_mask"] = (batch["completion_mask"].numpy() if "completion_mask" in batch
                      else (batch["labels"].numpy() != -100).astype(np.int32)
                      if "labels" in batch else None)
  return out


def trl_config(kind: str, out: str, steps: int, batch_size: int, length: int, lr: float,
               beta: float, pad_to_longest: bool = False):
  """TRL's config for the run; batches are padded to `length` unless `pad_to_longest` (TRL's
  default: each batch to its longest row)."""
  import trl
  common = dict(
      output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps,
      learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
      max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
      bf16=False, max_length=length, pad_to_multiple_of=None if pad_to_longest else length,
      dataloader_drop_last=True,
      train_sampling_strategy="sequential", seed=0)
  if kind == "sft":
    return trl.SFTConfig(completion_only_loss=True, **common)
  if kind == "rm":  # a pad token absent from the rows: HF pools the last non-pad token
    return trl.RewardConfig(pad_token="<|endoftext|>", center_rewards_coefficient=None,
                            **common)
  return trl.DPOConfig(beta=beta, loss_type=["sigmoid"], **common)


def trl_trainer_class(kind: str):
  import trl
  if kind == "sft":
    return trl.SFTTrainer
  if kind == "rm":
    return trl.RewardTrainer

  class PreTokenizedDPO(trl.DPOTrainer):
    """Takes rows already split into prompt_ids / chosen_ids / rejected_ids as they are."""

    def _prepare_dataset(self, dataset, *_, **__):
      return dataset

  return PreTokenizedDPO


def run_trl(kind: str, batches: dict, model_dir: str, lr: float, threads: int,
            lora: dict | None = None, beta: float = 0.1) -> dict:
  """Trains with TRL on the same rows; `lora` = {"rank", "alpha", "dropout"} adds a peft
  LoraConfig on all seven projections. Returns step times, first step, step-1 and last-step loss."""
  import datasets
  import torch
  import transformers
  from common import step_timer
  torch.set_num_threads(threads)
  steps, batch_size, length = next(v for k, v in batches.items() if k.endswith("input_ids")).shape
  auto = (transformers.AutoModelForSequenceClassification if kind == "rm"
          else transformers.AutoModelForCausalLM)
  rows = trl_rows(kind, batches)
  times, seen = [], []
  with tempfile.TemporaryDirectory() as out:
    trainer = trl_trainer_class(kind)(
        model=auto.from_pretrained(model_dir, dtype=torch.float32),
        args=trl_config(kind, out, steps, batch_size, length, lr, beta,
                        pad_to_longest="bucket_length" in batches),
        train_dataset=datasets.Dataset.from_list(rows), peft_config=peft_config(kind, lora),
        processing_class=transformers.AutoTokenizer.from_pretrained(model_dir),
        callbacks=[step_timer(times)])
    _check_pad_absent(kind, trainer, rows)
    trainer.data_collator = recording(trainer.data_collator, seen)
    trainer.train()
  check_same_tokens(kind, batches, seen, steps)
  losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
  return {"step_times": times[1:], "first_step": times[0], "check": losses[0],
          "last_loss": losses[-1]}


def peft_config(kind: str, lora: dict | None):
  """peft's LoraConfig for {"rank", "alpha", "dropout"} on all seven projections (None: off)."""
  if not lora:
    return None
  import peft
  return peft.LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                         target_modules=PEFT_TARGETS,
                         task_type="SEQ_CLS" if kind == "rm" else "CAUSAL_LM")


def recording(collate, seen: list):
  """`collate` that also appends each batch it makes to `seen`."""
  def record(examples):
    seen.append(collate(examples))
    return seen[-1]
  return record


def _check_pad_absent(kind: str, trainer, rows: list[dict]):
  if kind != "rm":
    return
  pad = trainer.processing_class.pad_token_id
  if any(pad in r["chosen_ids"] or pad in r["rejected_ids"] for r in rows):
    raise RuntimeError(f"pad id {pad} occurs in the reward rows: HF would pool the wrong token")
