"""Defaults of `config.data` (configs/base.py puts `data_defaults()` there); `KEYS` documents them.

Sources (`train`, `eval`) are one spec or a list of specs (a weighted mixture). A spec is

    "builtin:<task>"                      a built-in generated task (jaxpost.data.tasks)
    "/path/file.jsonl" | "/path/dir"      local json/jsonl/csv (also .gz/.bz2/.xz), parquet or
                                          arrow file(s), or a `save_to_disk` folder
    "org/name"                            a hub dataset (split from train_split / eval_split)
    [{"prompt": ..., ...}, ...]           Python rows (or a datasets.Dataset)
    {"source": <any of the above> | "rows": [...], "weight": 1.0, "max_rows": None,
     "split": None, "subset": None, "columns": {}, "task_kind": None, "name": None,
     "templates": None, "shots": [0], "options": "both", "options_column": "options",
     "chat": False}

`train` and `eval` accept any of these directly, from Python (`config.data.train = rows`) and
from the command line (`--config.data.train=data/x.jsonl`): they are untyped fields.

`weight`s set each source's share of an epoch (epoch size = sum of the sources' example
counts); with `mixture="examples"` (FLAN, T5 §3.5.2) source i's share is instead
w_i · min(n_i, K) / Σ_j w_j · min(n_j, K) for its n_i examples and `mixture_cap` K (0: no cap),
and an epoch is Σ_i min(n_i, K) examples. `max_rows` caps the rows read from a source.
`templates` (a list of {prompt, completion, name, inverted}; `data.templates` for every source
without its own) renders a source's rows of any columns into prompt/completion rows through
instruction templates, FLAN style: `shots` few-shot exemplar counts, answer `options`
(True | False | "both") from `options_column`, `chat` for one user and one assistant message
instead of plain strings (jaxpost/data/templates.py). `columns` maps canonical column names
(prompt, completion, chosen, rejected, margin, messages, text, responses, scores, label,
instruction, input, output, conversations, and the message keys role/content) to the dataset's
names. `task_kind` picks the rows a builtin task generates ("ranked" for reward models; None: the
loader's kind). `eval = "auto"` (the default) follows the training data: jaxpost/data/heldout.py.
"""

import ml_collections
from ml_collections import config_dict

KEYS = {  # data.<key>: doc
    "train": "training source spec(s), see the module docstring",
    "eval": 'eval source spec(s); "auto": the eval split of a built-in data.train task, else '
            'a held-out data.eval_fraction of data.train, else none; "" or None: none',
    "eval_fraction": 'with eval="auto": the fraction of each training source held out for eval '
                     "(not trained on); 0: no held-out rows",
    "train_split": "hub / save_to_disk split read for data.train",
    "eval_split": "hub / save_to_disk split read for data.eval",
    "columns": "canonical column name -> the dataset's column name",
    "templates": "instruction templates for every source without its own `templates` (module "
                 "docstring; None: rows are read as they are)",
    "mixture": "how sources share an epoch: weights (by `weight`) | examples (examples-"
               "proportional, times `weight`, capped at data.mixture_cap)",
    "mixture_cap": 'per-source cap K of data.mixture="examples" (0: none)',
    "max_length": "tokens per sequence (prompt + completion); longer rows are truncated",
    "max_prompt_length": "prompt token budget (None: max_length // 2 when cutting)",
    "max_completion_length": "completion token budget (None: the rest)",
    "truncation_mode": "which end of a prompt / unsplit sequence is kept: keep_end | keep_start",
    "buckets": "padded lengths of batches (None: multiples of max_length / 8, rounded up to "
               "a multiple of 8)",
    "packing": "first-fit-decreasing packing of SFT examples into rows of max_length (and of "
               "prefix-shared pair groups into rows, data.prefix_sharing)",
    "prefix_sharing": "preference pairs (DPO family, reward models) as one [prompt | chosen | "
                      "rejected] row each, GRPO / RLOO groups as [prompt | y_1 | ... | y_G] "
                      "segments packed into rows in the update passes: the prompt computed "
                      "once (DESIGN 'Prefix sharing')",
    "train_on": "trained tokens: all_assistant | last_assistant (assistant turns; TRL's "
                "assistant_only_loss / completion_only_loss) | all (every token but padding, "
                "TRL's default)",
    "chat_template": "Jinja template string or file (None: the tokenizer's own)",
    "system_prompt": "system message inserted when a conversation has none",
    "drop_bad_rows": "drop malformed rows and unreadable lines and count them in the summary "
                     "instead of failing",
    "task_kind": 'built-in tasks: the kind of rows generated, e.g. "ranked" (k responses + '
                 "scores -> pairs with margins); None: the loader's kind",
    "cache": "keep tokenised tables on disk and reuse them (jaxpost/data/cache.py)",
    "cache_dir": '"": $JAXPOST_CACHE/tokenized (default ~/.cache/jaxpost/tokenized)',
    "shuffle": "shuffle the training data (eval is read in order)",
    "prefetch": "batches prepared ahead by a background thread (0: none)",
}


def data_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train = config_dict.placeholder(object)  # untyped: a string, rows, a Dataset or specs
  c.eval = ml_collections.FieldReference("auto", field_type=object)
  c.eval_fraction = 0.0
  c.train_split = "train"
  c.eval_split = "test"
  c.task_kind = config_dict.placeholder(str)
  c.columns = ml_collections.ConfigDict()
  c.templates = ml_collections.FieldReference(None, field_type=object)
  c.mixture = "weights"
  c.mixture_cap = 0
  c.max_length = 1024
  c.max_prompt_length = None
  c.max_completion_length = None
  c.truncation_mode = "keep_end"
  c.buckets = None
  c.packing = False
  c.prefix_sharing = True
  c.train_on = "all_assistant"
  c.chat_template = None
  c.system_prompt = None
  c.drop_bad_rows = False
  c.cache = True
  c.cache_dir = ""
  c.shuffle = True
  c.prefetch = 2
  return c
