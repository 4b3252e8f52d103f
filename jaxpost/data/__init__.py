"""Data: row formats, chat templates and loss masks, static-shape batches, the resumable loader.

    from jaxpost.data import build_loader, data_defaults
    loader = build_loader(config.data, tokenizer, "sft" | "preference" | "unpaired" | "prompt",
                          batch_size=32, seed=0)
"""

from jaxpost.data.batching import (FIELDS, bucket_for, ffd_pack, pack_rows, pad_rows,
                                   resolve_buckets)
from jaxpost.data.chat import ChatTokenizer, Limits, tokenize_example
from jaxpost.data.config import data_defaults
from jaxpost.data.formats import KINDS, DataError, normalize_row
from jaxpost.data.loader import Loader, build_loader, format_summary

__all__ = ["FIELDS", "KINDS", "ChatTokenizer", "DataError", "Limits", "Loader", "bucket_for",
           "build_loader", "data_defaults", "ffd_pack", "format_summary", "normalize_row",
           "pack_rows", "pad_rows", "resolve_buckets", "tokenize_example"]
