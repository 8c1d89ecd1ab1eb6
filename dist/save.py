"""ZeRO-3's consolidated save, streamed: no rank ever holds the whole model (as FSDP's sharded state dicts).

`save_streamed` (full fine-tuning): the units (embeddings, each decoder block, final norm, LM head) are gathered
one at a time (a collective: every rank calls), rank 0 copies the unit's weights to CPU, and every
`max_shard_bytes` of them become one model-0000i-of-0000n.safetensors file of the HF dir (+ the index), written
into a temporary directory renamed into place at the end (model/atomic.py). Rank 0 holds at most one file's
tensors plus one gathered unit. `gathered_trainable`: an adapter needs only the (small) trainable weights.
"""
import contextlib
import json
from pathlib import Path

import torch

from model.atomic import atomic_dir
from model.weights import hf_config, write_shards

from . import zero3


def _unit_buckets(opt, model) -> list[list]:
    """Per unit module (zero3.unit_modules order): the stage-3 buckets holding its tensors."""
    out = []
    for u, m in enumerate(zero3.unit_modules(model)):
        idx = sorted({opt.where[id(p)][0] for p in m.parameters() if id(p) in opt.where})
        out.append([opt.buckets[i] for i in idx] + [b for b in opt.frozen if b.unit == u])
    return out


@torch.no_grad()
def save_streamed(opt, model, path, max_shard_bytes: int = 2**30, extra=None) -> Path:
    """Every rank calls; rank 0 writes HF dir `path` (config.json + safetensors shards + index; `extra(dir)`
    adds files, e.g. the tokenizer). The same tensors as model.save_pretrained inside gathered_params."""
    path, mods = Path(path), zero3.unit_modules(model)
    tied = model.cfg.tie_word_embeddings
    prefixes = {id(m): n + "." for n, m in model.named_modules()}
    sizes = [0 if (tied and m is model.lm_head) else sum(t.numel() * t.element_size() for t in m.state_dict().values())
             for m in mods]
    files, cur, size = [], [], 0  # unit indices per file, planned from the sizes (the file names need the count)
    for u, n in enumerate(sizes):
        if cur and size + n > max_shard_bytes:
            files.append(cur)
            cur, size = [], 0
        cur, size = cur + [u], size + n
    files.append(cur)
    per_unit = _unit_buckets(opt, model)

    def shards():
        for units in files:
            sd = {}
            for u in units:
                for b in per_unit[u]:
                    zero3.gather(b)
                if opt.rank == 0 and sizes[u]:
                    sd.update({prefixes[id(mods[u])] + k: v.detach().contiguous().cpu().clone()
                               for k, v in mods[u].state_dict().items()})
                for b in per_unit[u]:
                    zero3.free(b)
            yield sd

    if opt.rank != 0:
        for _ in shards():
            pass
        return path
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config(model), indent=2) + "\n")
        write_shards(tmp, shards(), len(files))
        if extra is not None:
            extra(tmp)
    return path


@contextlib.contextmanager
def saving(opt, model, stream=None, whole: bool = False, extra=None):
    """train.py's final save (every rank enters). Stage 3: with `stream` (an HF dir for full fine-tuning) rank 0
    writes it streamed and the context yields True; else the trainable weights (and with `whole` the frozen
    base: --merge) are gathered for rank 0's save_final, yielding False. Stages 1/2: a no-op."""
    if opt.stage != 3:
        yield False
    elif stream is not None:
        save_streamed(opt, model, stream, extra=extra)
        yield True
    else:
        with zero3.gathered_params(opt, frozen=whole):
            yield False
