"""Defaults of `config.data` (configs/base.py puts `data_defaults()` there).

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
"""

import ml_collections


def data_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train = None  # source spec(s), see the module docstring
  c.eval = None
  c.train_split = "train"  # hub split names for string sources
  c.eval_split = "test"
  c.columns = ml_collections.ConfigDict()  # canonical name -> dataset column
  c.max_length = 1024  # prompt + completion tokens
  c.max_prompt_length = None  # prompt budget (None: max_length // 2 when cutting)
  c.max_completion_length = None
  c.truncation_mode = "keep_end"  # which end of a prompt / unsplit sequence is kept
  c.buckets = None  # padded lengths; None: (max_length/4, max_length/2, max_length)
  c.packing = False  # SFT only: first-fit-decreasing packing into rows of max_length
  c.train_on = "all_assistant"  # or "last_assistant" (multi-turn SFT masks)
  c.chat_template = None  # Jinja string or file; None: the tokenizer's template
  c.system_prompt = None  # inserted when a conversation has no system message
  c.drop_bad_rows = False  # True: drop bad rows and count them in the summary
  c.shuffle = True  # train split only; eval is read in order
  c.prefetch = 2  # batches prepared ahead by a background thread (0: none)
  return c
