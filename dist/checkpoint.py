"""World-size independent ZeRO checkpoints, written and read shard by shard.

One safetensors file holds, per trainable parameter name, the unpadded fp32 master weight `param.<name>` and the
AdamW moments `exp_avg.<name>`, `exp_avg_sq.<name>`; the metadata holds the step and the optimizer groups'
hyper-parameters. Nothing depends on the bucket layout or the number of ranks, so a run saved with N ranks
resumes with M: each rank re-slices its own shard out of the full tensors.

Streamed, as dist/save.py streams the model: every rank knows every name and shape, so rank 0 writes the
safetensors header first and then, bucket by bucket and kind by kind, the all-gathered fp32 tensors at their
offsets (an ordinary safetensors file, written through model/atomic.py's atomic_file). Rank 0 holds one bucket of
one kind at a time, never the whole fp32 master + Adam state; loading reads on each rank only the rows that
overlap its own shards (sharded_load.ShardSource.read).
"""
import json
import struct

import torch
import torch.distributed as dist
from safetensors import safe_open

from model.atomic import atomic_file

from .bucket import collective
from .sharded_load import ShardSource

FORMAT = "nanotune-zero-v1"
KINDS = ("param", "exp_avg", "exp_avg_sq")


def _state_shard(opt, b, kind: str) -> torch.Tensor:
    """(S,) fp32 shard of bucket b for one kind, in bucket coordinates (zeros where there is no state yet)."""
    if kind == "param":
        return b.master
    flat = torch.zeros(b.shard_numel, dtype=torch.float32, device=b.master.device)
    for sb, a, e, seg in opt.segments:
        if sb is b and kind in opt.optimizer.state.get(seg, {}):
            flat[a - b.lo:e - b.lo].copy_(opt.optimizer.state[seg][kind])
    return flat


@torch.no_grad()
def _gathered(opt, kinds):
    """Yields (kind, bucket, (padded,) fp32 CPU tensor on rank 0 / None elsewhere), one bucket and kind at a
    time, in a fixed order; every rank must consume it all (each item is an all-gather)."""
    for b in opt.buckets:
        for kind in kinds:
            shard = _state_shard(opt, b, kind).to(opt.device)
            full = torch.empty(b.padded, dtype=torch.float32, device=opt.device)
            collective("all_gather", full, shard.contiguous())
            yield kind, b, (full.cpu() if opt.rank == 0 else None)
            del full


def full_state(opt, kinds=KINDS) -> dict[str, torch.Tensor]:
    """{"<kind>.<name>": unpadded fp32 tensor} on rank 0 ({} elsewhere); every rank must call it."""
    out = {}
    for kind, b, full in _gathered(opt, kinds):
        if full is not None:
            out.update({f"{kind}.{n}": v.clone() for n, v in zip(b.names, b.views(full))})
    return out


def consolidated_params(opt) -> dict[str, torch.Tensor]:
    """Full fp32 trainable parameters by name, on rank 0 ({} elsewhere): for an HF dir or a PEFT adapter."""
    return {k.split(".", 1)[1]: v for k, v in full_state(opt, ("param",)).items()}


def _header(opt) -> bytes:
    """The safetensors header of the checkpoint: every tensor F32, in _gathered's order, back to back."""
    hyper = [{k: v for k, v in g.items() if k in ("lr", "betas", "eps", "weight_decay")}
             for g in opt.optimizer.param_groups]
    head, off = {"__metadata__": {"format": FORMAT, "step": str(opt.step_count), "groups": json.dumps(hyper)}}, 0
    for b in opt.buckets:
        for kind in KINDS:
            for n, p in zip(b.names, b.params):
                head[f"{kind}.{n}"] = {"dtype": "F32", "shape": list(p.shape), "data_offsets": [off, off + 4 * p.numel()]}
                off += 4 * p.numel()
    js = json.dumps(head, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)  # the tensor data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(js)) + js


def save_checkpoint(opt, path):
    """Every rank calls; rank 0 writes `path` (a .safetensors file), streamed. If rank 0 cannot write it (a full
    disk), every rank still takes part in all the gathers; then rank 0 raises its OSError and the others exit
    with a one-line error (no rank is left waiting in a collective)."""
    items, err = _gathered(opt, KINDS), None
    if opt.rank == 0:
        try:
            with atomic_file(path) as tmp, open(tmp, "wb") as fh:
                fh.write(_header(opt))
                for _, b, full in items:
                    for v in b.views(full):
                        fh.write(v.reshape(-1).numpy().data)  # little-endian fp32: safetensors' byte order
        except OSError as e:  # atomic_file removed the partial file
            err = e
    for _ in items:  # the other ranks' gathers, and rank 0's that an error left undone
        pass
    failed = torch.tensor([0.0 if err is None else 1.0], device=opt.device)
    if dist.is_initialized():
        dist.all_reduce(failed)
    if err is not None:
        raise err
    if failed.item():
        raise SystemExit(f"error: rank 0 could not write {path}; see its message")


@torch.no_grad()
def load_checkpoint(opt, path):
    """Every rank reads its shards of `path` (only the rows overlapping them); a one-line error if the names or
    shapes differ."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a nanotune ZeRO checkpoint (format {meta.get('format')!r})")
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    saved = {k.split(".", 1)[1] for k in keys if k.startswith("param.")}
    missing, unexpected = sorted(set(opt.names) - saved), sorted(saved - set(opt.names))
    if missing or unexpected:
        raise ValueError(f"{path}: parameter names do not match the model: missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{'...' if len(unexpected) > 3 else ''}")
    src = ShardSource(dict.fromkeys(keys, path), {}, "cpu")
    flats = {}
    for bi, b in enumerate(opt.buckets):
        for kind in KINDS:
            flat = torch.zeros(b.shard_numel, dtype=torch.float32)  # (S,) this rank's shard, padding zero
            for n, p, off in zip(b.names, b.params, b.offsets):
                if shapes.get(f"{kind}.{n}") != tuple(p.shape):
                    raise ValueError(f"{path}: {kind}.{n} has shape {shapes.get(f'{kind}.{n}')}, "
                                     f"the model {tuple(p.shape)}")
                a, e = max(off, b.lo), min(off + p.numel(), b.hi)
                if a < e:
                    flat[a - b.lo:e - b.lo] = src.read(f"{kind}.{n}", a - off, e - off).to(torch.float32)
            flats[bi, kind] = flat
    step = int(meta["step"])
    for bi, b in enumerate(opt.buckets):
        b.master.copy_(flats[bi, "param"])
    # hand AdamW its state through its own load_state_dict (it places `step` as fused/foreach expect)
    sd = opt.optimizer.state_dict()
    index = {id(seg): i for i, seg in enumerate(p for g in opt.optimizer.param_groups for p in g["params"])}
    sd["state"] = {}
    for b, a, e, seg in opt.segments:
        bi = opt.buckets.index(b)
        sd["state"][index[id(seg)]] = {"step": torch.tensor(float(step)),
                                      "exp_avg": flats[bi, "exp_avg"][a - b.lo:e - b.lo].clone(),
                                      "exp_avg_sq": flats[bi, "exp_avg_sq"][a - b.lo:e - b.lo].clone()}
    hyper = json.loads(meta["groups"])
    if len(hyper) != len(sd["param_groups"]):
        raise ValueError(f"{path}: {len(hyper)} optimizer groups saved, this optimizer has {len(sd['param_groups'])}")
    for g, h in zip(sd["param_groups"], hyper):
        g.update(h, betas=tuple(h["betas"]))
    opt.optimizer.load_state_dict(sd)
    opt.step_count = step
    opt.publish()
