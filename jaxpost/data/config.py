"""Defaults of `config.data` (configs/base.py puts `data_defaults()` there).

Sources (`train`, `eval`) are one spec or a list of specs (a weighted mixture). A spec is

    "builtin:<task>"                      a built-in generated task (jaxpost.data.tasks)
    "/path/file.jsonl" | "/path/dir"      local json/jsonl/csv (also .gz/.bz2/.xz), parquet or
                                          arrow file(s), or a `save_to_disk` folder
    "org/name"                            a hub dataset (split from train_split / eval_split)
    [{"prompt": ..., ...}, ...]           Python rows (or a datasets.Dataset)
    {"source": <any of the above> | "rows": [...], "weight": 1.0, "max_rows": None,
     "split": None, "subset": None, "columns": {}, "task_kind": None, "name": None}

`train` and `eval` accept any of these directly, from Python (`config.data.train = rows`) and
from the command line (`--config.data.train=data/x.jsonl`): they are untyped fields.

`weight`s set each source's share of an epoch (epoch size = sum of the sources' example
counts); `max_rows` caps the rows read from a source. `columns` maps canonical column names
(prompt, completion, chosen, rejected, margin, messages, text, responses, scores, label,
instruction, input, output, conversations, and the message keys role/content) to the dataset's
names. `task_kind` picks the rows a builtin task generates ("ranked" for reward models; None: the
loader's kind).
"""

import ml_collections
from ml_collections import config_dict


def data_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train = config_dict.placeholder(object)  # source spec(s), see the module docstring
  c.eval = config_dict.placeholder(object)
  c.train_split = "train"  # hub split names for string sources
  c.eval_split = "test"
  c.task_kind = config_dict.placeholder(str)  # builtin tasks: row kind, e.g. "ranked"
  c.columns = ml_collections.ConfigDict()  # canonical name -> dataset column
  c.max_length = 1024  # prompt + completion tokens
  c.max_prompt_length = None  # prompt budget (None: max_length // 2 when cutting)
  c.max_completion_length = None
  c.truncation_mode = "keep_end"  # which end of a prompt / unsplit sequence is kept
  c.buckets = None  # padded lengths; None: (max_length/4, max_length/2, max_length)
  c.packing = False  # SFT only: first-fit-decreasing packing into rows of max_length
  c.train_on = "all_assistant"  # "last_assistant", or "all": every token (TRL's default)
  c.chat_template = None  # Jinja string or file; None: the tokenizer's template
  c.system_prompt = None  # inserted when a conversation has no system message
  c.drop_bad_rows = False  # True: drop bad rows and unreadable lines, counted in the summary
  c.cache = True  # keep tokenised tables on disk (jaxpost/data/cache.py)
  c.cache_dir = ""  # "": $JAXPOST_CACHE/tokenized (default ~/.cache/jaxpost/tokenized)
  c.shuffle = True  # train split only; eval is read in order
  c.prefetch = 2  # batches prepared ahead by a background thread (0: none)
  return c
