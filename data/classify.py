"""Records for train.py --task classify (a text and its label) and --task reward (chosen / rejected pairs).

classify: {"text": str, "label": str | int} per record, from every file format data/ reads (JSONL, JSON, CSV/TSV,
Parquet...; --columns renames, e.g. text=review,label=sentiment). String labels form the label set, sorted
(numerically when they are all digits) unless --labels fixes it (and its order): its names become the model's
id2label / label2id. Int labels are indices into --labels, or into LABEL_0 .. LABEL_{max} without it. The text is
tokenised as transformers' tokenizer(text, truncation=True) does: special tokens as the tokenizer adds them, no EOS
appended, the first --seq-len tokens kept.

reward: the preference files of --stage dpo (data/preference.py, data/pairs.py): prompt + chosen and
prompt + rejected are scored as two sequences.
"""
from dataclasses import dataclass, replace

import numpy as np

from . import datasets
from .batches import collate
from .encode import Example
from .errors import DataError
from .records import rename
from .sources import iter_file
from .splits import load_splits as load_pairs


@dataclass
class Text(Example):
    label: int = -1  # index into the label set (model.classify's score rows); collate gives them as class_labels

    @classmethod
    def of(cls, ids, label: int, truncated: bool = False) -> "Text":
        ids = np.array(ids, dtype=np.int32)
        return cls(ids, np.zeros(len(ids), dtype=bool), truncated, None, label)


def read_labelled(src, stats: dict) -> list[tuple[str, str, object]]:
    """(where, text, label) of every record of a data.datasets.Source; a bad record is a DataError naming it
    (skipped and counted with --skip-bad-records)."""
    out = []
    for path in src.paths:
        n = 0
        for where, rec in iter_file(path, src.opts.text_split):
            if src.opts.max_samples and n >= src.opts.max_samples:
                break
            try:
                if isinstance(rec, DataError):
                    raise rec
                rec = rename(rec, src.opts.columns)
                if not isinstance(rec, dict) or "text" not in rec or "label" not in rec:
                    keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
                    raise DataError(f"{where}: --task classify needs fields 'text' and 'label' (got: {keys})")
                text, label = rec["text"], rec["label"]
                if not isinstance(text, str) or not text.strip():
                    raise DataError(f"{where}: field 'text' must be a non-empty string")
                if isinstance(label, bool):  # CSV true/false cells arrive as bools: names like any other
                    label = str(label).lower()
                if not isinstance(label, (str, int)) or (isinstance(label, str) and not label.strip()):
                    raise DataError(f"{where}: field 'label' must be a string or an integer, got {label!r}")
            except DataError:
                if not src.opts.skip_bad:
                    raise
                stats["bad"] += 1
                continue
            n += 1
            out.append((where, text, label.strip() if isinstance(label, str) else label))
        if n == 0 and not stats["bad"]:
            raise DataError(f"{path}:1: empty file (no records)")
    return out


def label_set(records, given: str) -> list[str]:
    """The label names: --labels (comma-separated) as given, else the training records' string labels sorted, or
    LABEL_i for int labels. Mixed kinds, a label outside --labels or fewer than 2 classes: DataError naming the
    record (file:line)."""
    names = [s.strip() for s in given.split(",")] if given else None
    kinds = {type(lab) for _, _, lab in records}
    if len(kinds) > 1:
        w = next(w for w, _, lab in records if type(lab) is not type(records[0][2]))
        raise DataError(f"{w}: labels mix strings and integers ({records[0][0]} has {records[0][2]!r})")
    if names is None:
        if kinds == {int}:
            if any(lab < 0 for _, _, lab in records):
                w, _, lab = next(r for r in records if r[2] < 0)
                raise DataError(f"{w}: label {lab} is negative (int labels are class indices)")
            names = [f"LABEL_{i}" for i in range(max(lab for _, _, lab in records) + 1)]
        else:
            seen = sorted({lab for _, _, lab in records})
            names = sorted(seen, key=int) if all(s.isdigit() for s in seen) else seen
    used = {lab if isinstance(lab, str) else names[lab] for _, _, lab in records
            if isinstance(lab, str) or lab < len(names)}
    if len(used) < 2:
        w = records[0][0].rsplit(":", 1)[0]
        raise DataError(f"{w}: every record has label {records[0][2]!r}: one class only (classification needs "
                        "at least 2)")
    return names


def encode(tok, records, names: list[str], seq_len: int, given: bool) -> tuple[list[Text], int]:
    """Text examples (label indices into `names`); returns (examples, how many were truncated)."""
    index = {n: i for i, n in enumerate(names)}
    out, cut = [], 0
    for where, text, lab in records:
        i = index.get(lab) if isinstance(lab, str) else lab
        if i is None or not 0 <= i < len(names):
            whose = "--labels" if given else "the training data"
            raise DataError(f"{where}: label {lab!r} is not in the label set of {whose} ({', '.join(names)})")
        ids = tok.encode(text, add_special_tokens=True)
        cut += len(ids) > seq_len
        out.append(Text.of(ids[:seq_len], i, len(ids) > seq_len))
    return out, cut


def batches(examples: list, batch_size: int, pad_id: int):
    """The eval set's collated batches, in order (model/classify.py evaluate)."""
    return (collate(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size))


def load_splits(tok, cfg, verbose: bool = True):
    """train.py's (train, eval, stats) for --task classify | reward. classify sets cfg.labels to the label set
    (written into the run's config.json and the saved model's id2label)."""
    if cfg.task == "reward":  # preference pairs, tokenised as --stage dpo's (data/pairs.py)
        return load_pairs(tok, replace(cfg, stage="dpo"), verbose)
    stats = {"bad": 0}
    recs = [r for s in datasets.sources(cfg, cfg.data, verbose) for r in read_labelled(s, stats)]
    names = label_set(recs, cfg.labels)
    train, cut = encode(tok, recs, names, cfg.seq_len, bool(cfg.labels))
    ev = []
    if cfg.eval_data:
        erecs = [r for s in datasets.sources(cfg, cfg.eval_data, verbose) for r in read_labelled(s, stats)]
        ev, _ = encode(tok, erecs, names, cfg.seq_len, bool(cfg.labels))
    elif cfg.eval_split:
        order = np.random.default_rng(cfg.seed).permutation(len(train))
        n = max(1, int(len(train) * cfg.eval_split))
        ev, train = [train[i] for i in order[:n]], [train[i] for i in sorted(order[n:])]
    cfg.labels = ",".join(names)
    counts = np.bincount([e.label for e in train], minlength=len(names))
    if verbose:
        print(f"data: {len(recs)} records -> {len(train)} train / {len(ev)} eval examples; labels "
              + ", ".join(f"{n} ({c})" for n, c in zip(names, counts)) + f"; {cut} truncated to {cfg.seq_len} tokens"
              + (f"; {stats['bad']} bad records skipped" if cfg.skip_bad_records else ""), flush=True)
    if not train:
        raise DataError(f"{cfg.data}: no usable training examples")
    stats.update(records=len(recs), truncated=cut, no_target=0, tokens=int(sum(len(e) for e in train)),
                 trained_tokens=len(train), prompts=[])
    return train, ev, stats
