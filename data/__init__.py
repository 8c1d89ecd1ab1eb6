"""nanotune data: read and validate chat/text records, tokenise through the chat template, pack and batch;
preference pairs and labelled completions for train.py --stage dpo|kto (data/pairs.py)."""
from .batches import (BatchOrder, batch_order, collate, count_targets, load_examples, pack, precompute_reference,
                      prompt_ids)
from .chat import Chat
from .datasets import check_flags, fingerprint
from .encode import Example, assistant_spans, encode_record
from .pairs import Labelled, Pair, load_preference
from .preference import Preference
from .records import DataError, ReadOptions, normalise, read_preferences, read_records
from .splits import load_splits, make_order
from . import classify  # noqa: E402  (train.py --task classify | reward: data.classify.load_splits)

__all__ = ["BatchOrder", "Chat", "DataError", "Example", "Labelled", "Pair", "Preference", "ReadOptions",
           "assistant_spans", "batch_order", "classify", "check_flags", "collate", "count_targets", "encode_record", "fingerprint",
           "load_examples", "load_preference", "load_splits", "make_order", "normalise", "pack", "precompute_reference",
           "prompt_ids", "read_preferences", "read_records"]
