"""nanotune data: read and validate chat/text records, tokenise through the chat template, pack and batch;
preference pairs and labelled completions for train.py --stage dpo|kto (data/pairs.py)."""
from .batches import (BatchOrder, batch_order, collate, count_targets, load_examples, load_splits, pack,
                      precompute_reference, prompt_ids)
from .encode import Example, assistant_spans, encode_record
from .pairs import Labelled, Pair, load_preference
from .records import DataError, normalise, read_records

__all__ = ["BatchOrder", "DataError", "Example", "Labelled", "Pair", "assistant_spans", "batch_order", "collate",
           "count_targets", "encode_record", "load_examples", "load_preference", "load_splits", "normalise", "pack",
           "precompute_reference", "prompt_ids", "read_records"]
