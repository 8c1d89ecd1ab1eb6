"""World-size independent ZeRO checkpoints.

One safetensors file written by rank 0 holds, per trainable parameter name, the unpadded fp32 master weight
`param.<name>` and the AdamW moments `exp_avg.<name>`, `exp_avg_sq.<name>`; the metadata holds the step and the
optimizer groups' hyper-parameters. Nothing depends on the bucket layout or the number of ranks, so a run saved
with N ranks resumes with M: each rank re-slices its own shard out of the full tensors.
"""
import json

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .bucket import collective

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
def full_state(opt, kinds=KINDS) -> dict[str, torch.Tensor]:
    """{"<kind>.<name>": unpadded fp32 tensor} on rank 0 ({} elsewhere); every rank must call it."""
    out = {}
    for b in opt.buckets:
        for kind in kinds:
            shard = _state_shard(opt, b, kind).to(opt.device)
            full = torch.empty(b.padded, dtype=torch.float32, device=opt.device)
            collective("all_gather", full, shard.contiguous())
            if opt.rank == 0:
                for name, view in zip(b.names, b.views(full)):
                    out[f"{kind}.{name}"] = view.cpu().clone()
    return out


def consolidated_params(opt) -> dict[str, torch.Tensor]:
    """Full fp32 trainable parameters by name, on rank 0 ({} elsewhere): for an HF dir or a PEFT adapter."""
    return {k.split(".", 1)[1]: v for k, v in full_state(opt, ("param",)).items()}


def save_checkpoint(opt, path):
    """Every rank calls; rank 0 writes `path` (a .safetensors file)."""
    tensors = full_state(opt)
    if opt.rank == 0:
        hyper = [{k: v for k, v in g.items() if k in ("lr", "betas", "eps", "weight_decay")}
                 for g in opt.optimizer.param_groups]
        save_file(tensors, str(path), metadata={"format": FORMAT, "step": str(opt.step_count),
                                                "groups": json.dumps(hyper)})
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def load_checkpoint(opt, path):
    """Every rank reads `path` and takes its shard; raises a one-line error if the names or shapes differ."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a nanotune ZeRO checkpoint (format {meta.get('format')!r})")
        keys = set(f.keys())
        saved = {k.split(".", 1)[1] for k in keys if k.startswith("param.")}
        missing, unexpected = sorted(set(opt.names) - saved), sorted(saved - set(opt.names))
        if missing or unexpected:
            raise ValueError(f"{path}: parameter names do not match the model: missing {missing[:3]}"
                             f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                             f"{'...' if len(unexpected) > 3 else ''}")
        flats = {}
        for bi, b in enumerate(opt.buckets):
            for kind in KINDS:
                ts = [f.get_tensor(f"{kind}.{n}") for n in b.names]
                for n, t, p in zip(b.names, ts, b.params):
                    if t.shape != p.shape:
                        raise ValueError(f"{path}: {kind}.{n} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
                flats[bi, kind] = b.flatten(ts, torch.float32, "cpu")[b.lo:b.hi]
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
