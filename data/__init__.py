"""nanotune data: read and validate chat/text records, tokenise through the chat template, pack and batch."""
from .batches import BatchOrder, batch_order, collate, count_targets, load_examples, load_splits, pack, prompt_ids
from .encode import Example, assistant_spans, encode_record
from .records import DataError, normalise, read_records

__all__ = ["BatchOrder", "DataError", "Example", "assistant_spans", "batch_order", "collate", "count_targets",
           "encode_record", "load_examples", "load_splits", "normalise", "pack", "prompt_ids", "read_records"]
