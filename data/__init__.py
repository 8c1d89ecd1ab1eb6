"""nanotune data: read and validate chat/text records, tokenise through the chat template, pack and batch."""
from .batches import BatchOrder, batch_order, collate, count_targets, load_examples, pack, prompt_ids
from .chat import Chat
from .datasets import check_flags, fingerprint
from .encode import Example, assistant_spans, encode_record
from .preference import Preference
from .records import DataError, ReadOptions, normalise, read_preferences, read_records
from .splits import load_splits, make_order

__all__ = ["BatchOrder", "Chat", "DataError", "Example", "Preference", "ReadOptions", "assistant_spans",
           "batch_order", "check_flags", "collate", "count_targets", "encode_record", "fingerprint", "load_examples",
           "load_splits", "make_order", "normalise", "pack", "prompt_ids", "read_preferences", "read_records"]
