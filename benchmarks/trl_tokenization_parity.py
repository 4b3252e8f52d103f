"""Parity check: jaxpost preference tokenisation vs TRL's DPOTrainer (same rows -> same ids).

    python benchmarks/trl_tokenization_parity.py   # skips cleanly when trl is not installed

Builds a DPOTrainer (tiny random torch model, SmolLM2 tokenizer) so TRL's own dataset
preparation runs (prompt extraction, EOS for standard rows, chat template, prompt/completion
split), then compares every row's prompt+chosen / prompt+rejected ids and completion masks with
`jaxpost.data` (no truncation on either side: max_length=None / large).
"""

import copy
import sys
import tempfile

import numpy as np

U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
S = lambda c: {"role": "system", "content": c}
GROUPS = {
    "conversational explicit": [
        {"prompt": [U("What color is the sky?")], "chosen": [A("It is blue.")],
         "rejected": [A("It is green.")]},
        {"prompt": [S("Be brief."), U("2+2?"), A("4"), U("And 3+3?")], "chosen": [A("6")],
         "rejected": [A("Seven, probably.\nOr eight.")]},
        {"prompt": [U("Write a haiku about JAX.")],
         "chosen": [A("Arrays flow through jit\nXLA hums on the TPU\ngradients descend")],
         "rejected": [A("no")]},
    ],
    "conversational implicit": [
        {"chosen": [U("Capital of France?"), A("Paris.")],
         "rejected": [U("Capital of France?"), A("Lyon.")]},
        {"chosen": [U("Hi"), A("Hello!"), U("Tell a joke"), A("Why did the GPU cross the road?")],
         "rejected": [U("Hi"), A("Hello!"), U("Tell a joke"), A("No.")]},
    ],
    "standard explicit": [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "Q: What is 2+2?\nA:", "chosen": " 4", "rejected": " 5, or maybe 22"},
    ],
    "standard implicit": [
        {"chosen": "The sun is in the sky.", "rejected": "The sun is in the sea."},
        {"chosen": "def f(x): return x + 1", "rejected": "def f(x): return x - 1"},
    ],
}


def trl_rows(tokenizer, rows):
  import datasets
  import torch
  import transformers
  from trl import DPOConfig, DPOTrainer
  from trl.trainer.dpo_trainer import DataCollatorForPreference
  cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg)
  with tempfile.TemporaryDirectory() as tmp:
    args = DPOConfig(output_dir=tmp, report_to=[], max_length=None, use_cpu=True, bf16=False)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                         processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(rows))
    ds = trainer.train_dataset
  collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, return_tensors="pt")
  out = []
  for ex in ds:
    b = collate([{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
    n = len(b["input_ids"]) // 2
    keep = [b["attention_mask"][i].numpy() == 1 for i in (0, n)]
    out.append([(b["input_ids"][i].numpy()[k], b["completion_mask"][i].numpy()[k])
                for i, k in zip((0, n), keep)])
  return out


def jaxpost_rows(tokenizer, rows):
  from jaxpost.data import ChatTokenizer, Limits, normalize_row, tokenize_example
  ct, lim = ChatTokenizer(tokenizer), Limits(max_length=1 << 20)
  out = []
  for i, row in enumerate(rows):
    (ex,) = normalize_row(row, "preference", index=i)
    r = tokenize_example(ct, ex, "preference", lim)
    out.append([(r["chosen_ids"], r["chosen_mask"]), (r["rejected_ids"], r["rejected_mask"])])
  return out


def main() -> int:
  try:
    import trl
  except ImportError:
    print("SKIP: trl is not installed (pip install --no-deps trl accelerate)")
    return 0
  from jaxpost.hf import load_tokenizer, resolve_model_dir
  tokenizer = load_tokenizer(resolve_model_dir("bundled:smollm2-135m-instruct"))
  total = mismatches = 0
  for name, rows in GROUPS.items():
    ref, ours = trl_rows(tokenizer, rows), jaxpost_rows(tokenizer, rows)
    for i, (r, o) in enumerate(zip(ref, ours)):
      for side, (ri, rm), (oi, om) in zip(("chosen", "rejected"), r, o):
        total += 1
        same_ids, same_mask = np.array_equal(ri, oi), np.array_equal(rm, om)
        if not (same_ids and same_mask):
          mismatches += 1
          print(f"MISMATCH {name} row {i} {side}: ids equal={same_ids} mask equal={same_mask}\n"
                f"  trl    : {tokenizer.decode(ri)!r}\n  jaxpost: {tokenizer.decode(oi)!r}")
    print(f"{name}: {len(rows)} rows checked")
  print(f"trl {trl.__version__}: {total - mismatches}/{total} sequences identical (ids and "
        "completion masks)")
  return 1 if mismatches else 0


if __name__ == "__main__":
  sys.exit(main())
