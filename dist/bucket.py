"""Flat, padded, contiguous parameter buckets: the unit of every ZeRO collective.

gloo silently returns wrong data for a collective on a non-contiguous view (docs/dist.md), so every tensor we
hand to a collective is a whole flat buffer or a 1-D slice of one, and `collective` asserts it.
"""
import torch
import torch.distributed as dist


class Bucket:
    """Parameters laid out back to back in one flat buffer of `padded` elements, a multiple of the world size.
    Rank r owns bucket elements [lo, hi) = [r*S, (r+1)*S), S = padded / world. The zero padding at the end
    belongs to no parameter and is never optimized. Parameters are sorted by optimizer group (stable), so each
    group is one contiguous run and a rank's shard holds at most one AdamW segment per group. Stage 3's frozen
    tensors use the same layout (zero3.shard_frozen): no groups, no gradients, no master."""

    def __init__(self, names, params, groups, world: int, rank: int, sharded: bool = False, align: int = 1):
        order = sorted(range(len(params)), key=lambda i: groups[i])
        self.names = [names[i] for i in order]
        self.params = [params[i] for i in order]
        self.groups = [groups[i] for i in order]
        self.offsets, off = [], 0
        for p in self.params:
            self.offsets.append(off)
            off += p.numel()
        self.numel = off
        # align: shards hold whole multiples of `align` elements (NF4 codes: whole quantization blocks)
        self.shard_numel = -(-off // (world * align)) * align
        self.padded = self.shard_numel * world
        self.lo, self.hi = rank * self.shard_numel, (rank + 1) * self.shard_numel
        self.sharded = sharded      # stage 3: `full` lives only while gathered; `shard_param` persists
        self.full = None            # (padded,) compute dtype; the model's parameters are views of it
        self.shard_param = None     # (S,) compute dtype, stage 3 only
        self.master = None          # (S,) fp32 master weights (CPU when offloaded)
        self.grad = None            # (S,) fp32 reduced gradient shard (CPU when offloaded)
        self.flat_grad = None       # (padded,) compute dtype, stage 1: the params' .grad are views of it
        self.grad_buf = None        # (padded,) compute dtype, stage 2/3: transient, filled by backward hooks
        self.staged = None          # (S,) compute dtype, pinned host memory: offload's async copy of the shard
        self.ready = 0              # how many params reported their gradient in this backward
        self.free_with = []         # stage 3: frozen buckets to free with this one in backward (zero3.Gatherer)
        self.gathered = True        # `full` is allocated until stage 3 frees it

    def flatten(self, tensors, dtype, device) -> torch.Tensor:
        """(padded,) flat copy of per-parameter tensors in bucket order, zero padding."""
        flat = torch.zeros(self.padded, dtype=dtype, device=device)
        for t, off in zip(tensors, self.offsets):
            flat[off:off + t.numel()].copy_(t.reshape(-1))
        return flat

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views (original shapes) into a (padded,) flat buffer."""
        return [flat[o:o + p.numel()].view(p.shape) for p, o in zip(self.params, self.offsets)]

    def segments(self) -> list[tuple[int, int, int]]:
        """(group, start, end) runs of this rank's shard, in bucket coordinates, padding excluded."""
        out, i = [], 0
        while i < len(self.params):
            j = i
            while j < len(self.params) and self.groups[j] == self.groups[i]:
                j += 1
            a, b = max(self.offsets[i], self.lo), min(self.offsets[j - 1] + self.params[j - 1].numel(), self.hi)
            if a < b:
                out.append((self.groups[i], a, b))
            i = j
        return out


def collective(op: str, out: torch.Tensor, inp: torch.Tensor, group=None, async_op: bool = False):
    """reduce_scatter (SUM) or all_gather a flat buffer; with no process group (world size 1) a local copy."""
    assert out.is_contiguous() and inp.is_contiguous(), "collectives need contiguous buffers (gloo corrupts views)"
    if not dist.is_initialized():
        out.copy_(inp)
        return None
    # newer torch renames reduce_scatter_tensor / all_gather_into_tensor to *_single (the old names warn)
    if op == "reduce_scatter":
        fn = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
    else:
        fn = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
    return fn(out, inp, group=group, async_op=async_op)
