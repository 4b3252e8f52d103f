"""Defaults of `config.data` (configs/base.py puts `data_defaults()` there); `KEYS` documents them.

Sources (`train`, `eval`) are one spec or a list of specs (a weighted mixture). A spec is

    "builtin:<task>"                      a built-in generated task (jaxpost.data.tasks)
    "/path/file.jsonl" | "/path/dir"      local json/jsonl/parquet/csv/arrow file(s), or a
                                          `save_to_disk` folder
    "org/name"                            a hub dataset (split from train_split / eval_split)
    [{"prompt": ..., ...}, ...]           Python rows
    {"source": <any of the above> | "rows": [...], "weight": 1.0, "max_rows": None,
     "split": None, "subset": None, "columns": {}, "task_kind": None, "name": None}

`weight`s set each source's share of an epoch (epoch size = sum of the sources' example
counts); `max_rows` caps the rows read from a source. `columns` maps canonical column names
(prompt, completion, chosen, rejected, messages, text, responses, scores, label, instruction,
input, output, conversations, and the message keys role/content) to the dataset's names.
`eval = "auto"` (the default) follows the training data: jaxpost/data/heldout.py.
"""

import ml_collections

KEYS = {  # data.<key>: doc
    "train": "training source spec(s), see the module docstring",
    "eval": 'eval source spec(s); "auto": the eval split of a built-in data.train task, else '
            'a held-out data.eval_fraction of data.train, else none; "" or None: none',
    "eval_fraction": 'with eval="auto": the fraction of each training source held out for eval '
                     "(not trained on); 0: no held-out rows",
    "train_split": "hub / save_to_disk split read for data.train",
    "eval_split": "hub / save_to_disk split read for data.eval",
    "columns": "canonical column name -> the dataset's column name",
    "max_length": "tokens per sequence (prompt + completion); longer rows are truncated",
    "max_prompt_length": "prompt token budget (None: max_length // 2 when cutting)",
    "max_completion_length": "completion token budget (None: the rest)",
    "truncation_mode": "which end of a prompt / unsplit sequence is kept: keep_end | keep_start",
    "buckets": "padded lengths of batches (None: max_length / 4, / 2, max_length)",
    "packing": "SFT only: first-fit-decreasing packing of examples into rows of max_length",
    "train_on": "which assistant turns of a conversation are trained: all_assistant | "
                "last_assistant (TRL's assistant_only_loss / completion_only_loss)",
    "chat_template": "Jinja template string or file (None: the tokenizer's own)",
    "system_prompt": "system message inserted when a conversation has none",
    "drop_bad_rows": "drop malformed rows and count them in the summary instead of failing",
    "shuffle": "shuffle the training data (eval is read in order)",
    "prefetch": "batches prepared ahead by a background thread (0: none)",
}


def data_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train = None
  c.eval = "auto"
  c.eval_fraction = 0.0
  c.train_split = "train"
  c.eval_split = "test"
  c.columns = ml_collections.ConfigDict()
  c.max_length = 1024
  c.max_prompt_length = None
  c.max_completion_length = None
  c.truncation_mode = "keep_end"
  c.buckets = None
  c.packing = False
  c.train_on = "all_assistant"
  c.chat_template = None
  c.system_prompt = None
  c.drop_bad_rows = False
  c.shuffle = True
  c.prefetch = 2
  return c
