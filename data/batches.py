"""Datasets of tokenised examples, packing, the batch order, and collation into model inputs.

Labels follow the HF convention (labels[t] = ids[t] or -100; the loss shifts them by one). Packing puts several
examples in one row with position_ids restarting at 0 for each and a block-diagonal causal mask, so attention
never crosses an example boundary; the first token of each packed example is never a target (it would be
predicted from the previous example), exactly as it is not in an unpacked row.
"""
import random

import numpy as np
import torch

from model.progress import progress

from .encode import Example, encode_record
from .pairs import Labelled, Pair, n_prompt
from .records import DataError, ReadOptions, read_records


PREFERENCE_REFUSED = ("preference data (chosen/rejected pairs or a KTO label): train it with --stage dpo (pairs) or "
                      "--stage kto (labelled completions); supervised fine-tuning would train the rejected answers "
                      "as targets")


def load_examples(tok, paths, seq_len: int, template=None, train_on_prompt=False, skip_bad=False,
                  opts: ReadOptions | None = None, truncation: str = "auto"):
    """Read, validate and tokenise every record. Returns (examples, stats)."""
    stats = {"bad": 0, "records": 0, "truncated": 0, "no_target": 0, "too_long": 0}
    examples = []
    for where, kind, payload in progress(read_records(paths, skip_bad, stats, opts), "tokenising", unit="rec"):
        if kind == "preference":
            raise DataError(f"{where}: {PREFERENCE_REFUSED}")
        stats["records"] += 1
        try:
            exs = encode_record(tok, kind, payload, seq_len, template, train_on_prompt, truncation)
        except Exception as e:  # template errors (raise_exception in Jinja, ...) name the record too
            raise DataError(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        stats["too_long"] += not exs
        for ex in exs:
            stats["truncated"] += ex.truncated
            if ex.train[1:].any():  # position 0 is never predicted
                examples.append(ex)
            else:
                stats["no_target"] += 1
    stats["examples"] = len(examples)
    stats["tokens"] = int(sum(len(e.ids) for e in examples))
    stats["trained_tokens"] = int(sum(e.train[1:].sum() for e in examples))
    return examples, stats


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Greedy first-fit in order: concatenate examples into rows of at most seq_len tokens."""
    rows, cur = [], []

    def flush():
        if cur:
            rows.append(Example(np.concatenate([e.ids for e in cur]),
                                np.concatenate([np.r_[False, e.train[1:]] for e in cur]),
                                seg=np.concatenate([np.full(len(e.ids), i, np.int32) for i, e in enumerate(cur)])))
    for e in progress(examples, "packing", unit="ex"):
        if sum(len(c.ids) for c in cur) + len(e.ids) > seq_len:
            flush()
            cur = []
        cur.append(e)
    flush()
    return rows


class BatchOrder:
    """batch_order(...) for the epochs of one run, each epoch's order computed once (not once per step)."""

    def __init__(self, lengths, global_batch: int, seed: int, bucket: bool = True):
        self.lengths, self.global_batch, self.seed, self.bucket = lengths, global_batch, seed, bucket
        self.per_epoch = max(1, len(lengths) // global_batch)  # batches per epoch (a ragged last one is dropped)
        self._epoch, self._batches = None, None

    def epoch(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = batch_order(self.lengths, self.global_batch, self.seed, epoch, self.bucket)
        return self._batches

    def micro_batches(self, examples, step: int, rank: int, world: int, batch_size: int, grad_accum: int,
                      pad_id: int) -> list[dict]:
        """This rank's micro-batches for optimizer step `step` (0-based): a pure function of (seed, step), which
        is what makes resume exact. Global batch = batch_size x grad_accum x world; micro-batch j of rank r holds
        examples [(j * world + r) * B, ...) of it."""
        epoch, i = divmod(step, self.per_epoch)
        batch, B = self.epoch(epoch)[i], batch_size
        parts = [batch[(j * world + rank) * B:(j * world + rank + 1) * B] for j in range(grad_accum)]
        return [collate([examples[k] for k in part], pad_id) for part in parts if part]


def batch_order(lengths, global_batch: int, seed: int, epoch: int, bucket: bool = True) -> list[list[int]]:
    """The global batches of one epoch (lists of example indices), a pure function of (seed, epoch).
    Length bucketing: sort each window of 50 batches by length so a batch pads little, then shuffle the batches."""
    rng = random.Random(seed * 1000003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if bucket:
        win = 50 * global_batch
        idx = [i for w in range(0, len(idx), win) for i in sorted(idx[w:w + win], key=lambda i: lengths[i])]
    batches = [idx[i:i + global_batch] for i in range(0, len(idx), global_batch)]
    batches = [b for b in batches if len(b) == global_batch] or batches[:1]  # drop a ragged last batch
    if bucket:
        rng.shuffle(batches)
    return batches


def collate(examples: list, pad_id: int) -> dict:
    """-> input_ids (B, T), train_mask (B, T) bool (token t is a target: what the loss reads), labels (B, T) with
    -100 (HF's form of the same mask, for HF references), position_ids (B, T) or None, attention_mask: None (no
    padding), (B, T) padding mask, or (B, 1, T, T) bool block-diagonal causal mask for packed rows (which also get
    segments: each row's example lengths, model.ops.Segments)."""
    if not isinstance(examples[0], Example):  # preference stages (data/pairs.py)
        return (collate_pairs if isinstance(examples[0], Pair) else collate_labelled)(examples, pad_id)
    T = max(len(e.ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n] = torch.from_numpy(e.ids.astype(np.int64))
        mask[b, :n] = torch.from_numpy(e.train)
        valid[b, :n] = True
    out = {"input_ids": ids, "train_mask": mask, "labels": torch.where(mask, ids, -100), "position_ids": None,
           "attention_mask": None if valid.all() else valid.long()}
    if getattr(examples[0], "label", None) is not None:  # --task classify (data/classify.py): one target per row
        out.update(class_labels=torch.tensor([e.label for e in examples]), examples=B)
    if examples[0].seg is not None:
        seg = torch.full((B, T), -1, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        for b, e in enumerate(examples):
            s = torch.from_numpy(e.seg.astype(np.int64))
            seg[b, :len(s)] = s
            starts = torch.searchsorted(s, s, right=False)  # index of the first token of each token's example
            pos[b, :len(s)] = torch.arange(len(s)) - starts
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = (seg[:, :, None] == seg[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        out["attention_mask"] = (same & causal)[:, None]  # (B, 1, T, T)
        out["position_ids"] = pos
        # the same rows as example lengths (a trailing pad run as one more): attention without the mask (model.ops)
        out["segments"] = [np.unique(e.seg, return_counts=True)[1].tolist() + [T - len(e.seg)] * (T > len(e.seg))
                           for e in examples]
    return out


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict:
    """One batch of 2P rows: the P chosen completions, then the P rejected ones (one forward for both)."""
    b = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    b["pairs"] = len(pairs)
    if all(p.ref is not None for p in pairs):  # --precompute-ref
        b["ref_logps"] = torch.cat([torch.stack([p.ref[0] for p in pairs]), torch.stack([p.ref[1] for p in pairs])])
    return b


def collate_labelled(items: list[Labelled], pad_id: int) -> dict:
    """KTO: the P completions, then P mismatched ones for the KL estimate: prompt i with the completion of
    example i + 1 (cycled within the batch, as TRL builds its KL sequences), never trained, only scored."""
    exs = [it.example for it in items]
    kl = []
    for i, e in enumerate(exs):
        o = exs[(i + 1) % len(exs)]
        p, q = n_prompt(e), n_prompt(o)
        kl.append(Example(np.concatenate([e.ids[:p], o.ids[q:]]), np.concatenate([e.train[:p], o.train[q:]])))
    b = collate(exs + kl, pad_id)
    b["examples"] = len(items)
    b["desirable"] = torch.tensor([it.desirable for it in items])
    return b


def precompute_reference(splits, reference, batch_size: int, pad_id: int):
    """--precompute-ref: the reference log-probs of every pair of every split, stored on the pairs (collate_pairs
    then hands them to the loss as batch["ref_logps"])."""
    for items in splits:
        for i in range(0, len(items), batch_size):
            part = items[i:i + batch_size]
            ref = reference(collate(part, pad_id)).float().cpu()     # (2P,): chosen rows, then rejected
            for k, p in enumerate(part):
                p.ref = ref[[k, k + len(part)]]                        # (chosen, rejected)


def count_targets(batch) -> int:
    """Number of predicted tokens in a batch (position 0 is never predicted); preference batches: of pairs or
    labelled examples, what their loss averages over."""
    return batch.get("pairs") or batch.get("examples") or int(batch["train_mask"][:, 1:].sum())


def prompt_ids(ex: Example) -> list[int] | None:
    """The tokens before an example's first trained token (a chat's rendered prompt up to its first answer), to
    ask the model for a sample answer; None when the example has no untrained prompt (raw text,
    --train-on-prompt)."""
    ex = ex.chosen if isinstance(ex, Pair) else ex.example if isinstance(ex, Labelled) else ex
    first = np.flatnonzero(ex.train)
    return ex.ids[:first[0]].tolist() if len(first) and first[0] > 0 else None
