"""--stream: records read, tokenised and batched as training goes, so a multi-GB file starts in seconds with memory
bounded by a shuffle buffer instead of by the file.

The example stream is a pure function of the files and the seed: epoch e reads every source in order (mixed as
--mix says), shuffles through a buffer of BUFFER examples with Random(seed + e) (packs with --pack), and global batch
s is examples [s*G, (s+1)*G) of the epochs one after the other (a ragged last batch of an epoch dropped, as
BatchOrder does). Resuming at step S regenerates the stream and skips S*G examples, re-tokenising them: exact, and
as long as the data path up to there. A bad record is found when it is reached: the run stops at that step with the
one-line error (the checkpoints already written stay; --skip-bad-records skips such records instead).
"""
import random
import sys
from itertools import chain, islice

from . import datasets
from .batches import PREFERENCE_REFUSED, collate, pack
from .encode import encode_record
from .records import DataError, read_records

BUFFER = 1024  # examples in the shuffle buffer


class Stream:
    """The training examples of a config, lazily: examples(epoch) is an iterator."""

    def __init__(self, tok, cfg, verbose: bool = True):
        self.tok, self.cfg = tok, cfg
        self.sources = datasets.sources(cfg, cfg.data, verbose)
        for src in self.sources:
            if src.ranking or src.num_samples:
                raise DataError(f"{src.name}: {'ranking: ' + PREFERENCE_REFUSED if src.ranking else 'num_samples'}"
                                + ("" if src.ranking else " needs the whole dataset: not with --stream"))

    def _source(self, src):
        c = self.cfg
        for where, kind, payload in read_records(src.paths, opts=src.opts):
            if kind == "preference":
                raise DataError(f"{where}: {PREFERENCE_REFUSED}")
            try:
                exs = encode_record(self.tok, kind, payload, c.seq_len, c.template or None, c.train_on_prompt,
                                    c.truncation)
            except Exception as e:
                raise DataError(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            yield from (e for e in exs if e.train[1:].any())

    def examples(self, epoch: int):
        c = self.cfg
        its = [self._source(s) for s in self.sources]
        mixed = chain(*its) if c.mix == "concat" else (x for _, x in datasets.interleave_iter(
            its, datasets.mix_probs(c.mix_probs, len(its)), c.seed + epoch))
        out = _shuffled(mixed, BUFFER, random.Random(c.seed * 1000003 + epoch))
        return _packed(out, c.seq_len) if c.pack else out


def _shuffled(items, size, rng):
    buf = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


def _packed(items, seq_len):
    """pack() as a stream: consecutive examples first-fit into rows of at most seq_len tokens."""
    cur, n = [], 0
    for e in items:
        if cur and n + len(e.ids) > seq_len:
            yield pack(cur, seq_len)[0]
            cur, n = [], 0
        cur.append(e)
        n += len(e.ids)
    if cur:
        yield pack(cur, seq_len)[0]


class StreamOrder:
    """BatchOrder's interface over a Stream: micro_batches(_, step, ...) for consecutive steps (or any later step:
    the batches before it are regenerated and skipped)."""

    def __init__(self, stream: Stream, global_batch: int):
        self.stream, self.global_batch = stream, global_batch
        self.per_epoch = 1  # unknown without reading everything: --stream needs --max-steps
        self._it, self._pos = None, 0

    def _batches(self):
        for epoch in range(1 << 62):
            it, got = self.stream.examples(epoch), False
            while len(batch := list(islice(it, self.global_batch))) == self.global_batch:
                got = True
                yield batch
            if not got:
                raise DataError(f"{self.stream.cfg.data}: fewer usable examples than one global batch "
                                f"({self.global_batch})")

    def micro_batches(self, examples, step: int, rank: int, world: int, batch_size: int, grad_accum: int,
                      pad_id: int) -> list[dict]:
        if self._it is None or step < self._pos:
            self._it, self._pos = self._batches(), 0
        try:
            while self._pos <= step:
                batch = next(self._it)
                self._pos += 1
        except DataError as e:  # found mid-run: one line, the checkpoints already written stay
            sys.exit(f"error: {e}")
        B = batch_size
        parts = [batch[(j * world + rank) * B:(j * world + rank + 1) * B] for j in range(grad_accum)]
        return [collate(part, pad_id) for part in parts if part]
