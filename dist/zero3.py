"""ZeRO stage 3: parameters partitioned, gathered per block just before it runs and freed right after.

Each unit (the embeddings, every decoder block `model.model.layers[i]`, the final norm, the LM head) is one
bucket. Its model parameters are views of the bucket's flat buffer `full`, whose storage is resized to 0 while
the unit is not in use (as FSDP does): autograd's saved references to the weights stay valid, and see the
re-gathered values when backward needs them.
  forward:  pre-hook of a module -> all-gather the units it uses; post-hook of a unit's last user -> free.
  backward: hook on the module's output gradient -> all-gather again; when every parameter of the unit has
            reported its gradient (ZeroOptimizer._on_grad) -> free, since no backward node needs it any more.
Tied embeddings (lm_head.weight is embed_tokens.weight) just make the embedding unit live from the embedding
to the LM head. The final norm also gathers the LM head, for losses that use lm_head.weight directly.
Trainable parameters outside these modules (e.g. prompt embeddings) form one unit that is never freed.
Gradient checkpointing works: forward hooks do not free during backward (recomputation).

Frozen tensors (LoRA/QLoRA's base) are partitioned too, as in FSDP: per unit, one flat bucket per kind and dtype
(`shard_frozen`): dense frozen parameters in their own dtype, and NF4 layers' packed codes, absmax scales and
double-quant state, the codes and scales cut on quantization-block boundaries (rank r holds blocks [rK, (r+1)K)
of the unit). They are gathered with the unit for forward and for backward (the input gradient needs the
weight; NF4 dequantizes after the gather), never reduced, never in the optimizer, and freed in backward as soon
as backward through the unit is complete (Gatherer), else at the end of backward: one gathered block at a time.
"""
import contextlib

import torch

from .bucket import Bucket, collective


def unit_modules(model) -> list:
    """The modules whose parameters form one stage-3 unit each, in forward order."""
    if not (hasattr(model, "model") and hasattr(model.model, "layers")):
        raise ValueError("ZeRO stage 3 needs a decoder with model.model.layers (nanotune's Transformer)")
    return [model.model.embed_tokens, *model.model.layers, model.model.norm, model.lm_head]


def plan_units(model, named) -> list[tuple[list[str], bool]]:
    """Buckets as (param names, sharded) in backward order: last unit first, the never-freed rest last."""
    name_of = {id(p): n for n, p in named}
    seen, units = set(), []
    for m in unit_modules(model):
        names = [name_of[id(p)] for p in m.parameters() if id(p) in name_of and id(p) not in seen]
        seen.update(id(p) for p in m.parameters())
        if names:
            units.append((names, True))
    rest = [n for n, p in named if id(p) not in seen]
    return units[::-1] + ([(rest, False)] if rest else [])


def frozen_tensors(m) -> list[tuple[str, torch.nn.Module, str, torch.Tensor]]:
    """(kind, owner module, attribute, tensor) of a unit's frozen tensors: frozen parameters ("dense") and the
    buffers of NF4 layers (quant/linear.py NF4Weight): "packed" codes, "absmax" scales, "nested" double quant."""
    out = []
    for sub in m.modules():
        out += [("dense", sub, a, p) for a, p in sub._parameters.items() if p is not None and not p.requires_grad]
        if hasattr(sub, "set_nf4"):  # NF4Weight: the 4-bit weight lives in buffers
            kinds = (("weight", "packed"), ("absmax", "absmax"), ("nested_absmax", "nested"), ("nested_offset", "nested"))
            out += [(k, sub, a, sub._buffers[a]) for a, k in kinds if sub._buffers.get(a) is not None]
    return out


def plan_frozen(model) -> list[tuple[int, list, int]]:
    """Stage 3's frozen buckets as (unit index, [(owner, attribute, tensor)], align): one per unit, kind and
    dtype; NF4 codes aligned to whole blocks (blocksize / 2 bytes) when every layer is whole blocks."""
    seen, out = set(), []
    for u, m in enumerate(unit_modules(model)):
        groups = {}
        for kind, sub, attr, t in frozen_tensors(m):
            if id(t) not in seen:  # a tied frozen weight belongs to its first unit
                seen.add(id(t))
                groups.setdefault((kind, t.dtype), []).append((sub, attr, t))
        for (kind, _), items in groups.items():
            subs = [s for s, _, _ in items]
            aligned = kind == "packed" and len({s.blocksize for s in subs}) == 1 and all(
                (s.out_features * s.in_features) % s.blocksize == 0 for s in subs)
            out.append((u, items, subs[0].blocksize // 2 if aligned else 1))
    return out


@torch.no_grad()
def shard_frozen(model, world: int, rank: int, source=None) -> list[Bucket]:
    """Partition every unit's frozen tensors into sharded buckets (plan_frozen); the model's tensors become
    views of the buckets' `full`, which is freed now. Each rank keeps its slice of its own copy (no broadcast:
    every rank loaded the same frozen weights), or with `source` (dist/sharded_load.py) reads only its slice."""
    out = []
    for u, items, align in plan_frozen(model):
        ts = [t for _, _, t in items]
        b = Bucket([f"{u}.{a}" for _, a, _ in items], ts, [0] * len(ts), world, rank, sharded=True, align=align)
        shard = source.frozen(b, u, items, world, rank) if source is not None and source.covers(ts) else None
        if shard is None:
            b.full = b.flatten(ts, ts[0].dtype, ts[0].device)
        else:  # allocated but never written: freed below before any page is touched
            b.full = torch.empty(b.padded, dtype=ts[0].dtype, device=shard.device)
        for j, ((sub, attr, t), v) in enumerate(zip(items, b.views(b.full))):
            if isinstance(t, torch.nn.Parameter):
                t.data = v  # the same Parameter object wherever it is tied
            else:  # a buffer is replaced by the view: the bucket tracks the tensor the module now holds
                sub._buffers[attr] = b.params[j] = v
        b.shard_param = b.full[b.lo:b.hi].clone() if shard is None else shard
        b.unit = u
        free(b)
        out.append(b)
    return out


def gather(b: Bucket):
    if b.gathered:
        return
    b.full.untyped_storage().resize_(b.padded * b.full.element_size())
    # write through .data: autograd must not see a new version of the weights it saved in forward
    collective("all_gather", b.full.data, b.shard_param)
    b.gathered = True


def free(b: Bucket):
    if b.sharded and b.gathered:
        b.full.untyped_storage().resize_(0)
        b.gathered = False


class Gatherer:
    """Installs the forward/backward hooks that gather and free each module's units.

    A unit's frozen buckets are freed in backward once backward through the first module that uses them (in
    forward order) and runs backward is complete: when its input's gradient is complete, or, if its input needs
    no gradient (the first decoder block under LoRA), when all of its own trainable parameters have their
    gradients (ZeroOptimizer._on_grad: no node left in backward reads its weights then). A block's frees run
    before the previous block is gathered (both hooks sit on the tensor between them; `_after` leaves a list on
    it that `_before` fills), so at most one gathered block is alive at a time."""

    def __init__(self, opt, model):
        self.opt = opt
        modules = unit_modules(model)
        frozen_of = {id(t): b for b in opt.frozen for t in b.params}
        uses = []  # per module: the sharded buckets whose parameters (or frozen tensors) it uses
        for m in modules:
            bis = {opt.where[id(p)][0] for p in m.parameters() if id(p) in opt.where}
            fr = {id(frozen_of[id(t)]): frozen_of[id(t)] for *_, t in frozen_tensors(m) if id(t) in frozen_of}
            uses.append([opt.buckets[i] for i in sorted(bis) if opt.buckets[i].sharded] + list(fr.values()))
        own = [[b for b in bs if b not in opt.frozen] for bs in uses]  # a module's trainable buckets
        last = {id(b): i for i, bs in enumerate(uses) for b in bs}  # the unit's last user in forward
        # The final norm also gathers the LM head: a chunked loss (train.py) reads lm_head.weight after
        # forward(hidden_only=True) without calling lm_head. Backward or the end of backward frees it then.
        uses[-2] = uses[-2] + [b for b in uses[-1] if b not in uses[-2]]
        self._owned, self._prev = set(), len(modules)  # frozen buckets whose backward free is set, this forward
        for i, (m, bs) in enumerate(zip(modules, uses)):
            if bs:
                frees = [b for b in bs if last[id(b)] == i]
                frozen = [b for b in bs if b in opt.frozen]
                m.register_forward_pre_hook(
                    lambda mod, args, i=i, bs=bs, fr=frozen, own=own[i]: self._before(i, bs, fr, own, args))
                m.register_forward_hook(lambda mod, args, out, bs=bs, frees=frees: self._after(bs, frees, out))

    def _before(self, i, buckets, frozen, own, args):
        self._gather(buckets)
        if self.opt._in_backward or not torch.is_grad_enabled():  # recomputation, or no backward to come
            return
        if i <= self._prev:  # a new forward pass
            self._owned.clear()
        self._prev = i
        inputs = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
        if not (inputs or any(p.requires_grad for b in own for p in b.params)):
            return  # no backward through this module (e.g. LoRA's frozen embedding): a later user frees them
        done = [b for b in frozen if id(b) not in self._owned]
        self._owned.update(id(b) for b in done)
        for b in own:  # input needs no gradient: free with the module's trainable parameters' last gradient
            b.free_with = [] if inputs else done
        for t in inputs if done else ():  # else: when the input's gradient is complete
            pending = getattr(t, "_zero3_frees", None)
            if pending is not None:  # t is the previous unit's output: free there, before it gathers
                pending.extend(done)
            else:
                t.register_hook(self._backward_hook([], done))

    def _gather(self, buckets):
        with torch.no_grad():
            for b in buckets:
                gather(b)
        held = sum(b.full.untyped_storage().nbytes() for b in self.opt.buckets if b.sharded)
        self.opt.peak["params"] = max(self.opt.peak["params"], held)
        held = sum(b.full.untyped_storage().nbytes() for b in self.opt.frozen)
        self.opt.peak["frozen"] = max(self.opt.peak["frozen"], held)

    def _backward_hook(self, buckets, frees):
        """The hook on a unit's output (or a module's input) gradient: free `frees`, then gather `buckets`."""
        def hook(grad):
            self.opt._in_backward = True
            for b in frees:
                free(b)
            if buckets:
                self._gather(buckets)
        return hook

    def _after(self, buckets, frees, out):
        outs = out if isinstance(out, (tuple, list)) else [out]
        for t in outs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t._zero3_frees = []  # filled by the next module's _before (the frees of its backward's end)
                t.register_hook(self._backward_hook(buckets, t._zero3_frees))
        if not self.opt._in_backward:  # recomputation (gradient checkpointing) runs inside backward
            for b in frees:
                free(b)


@contextlib.contextmanager
def gathered_params(opt, frozen: bool = True):
    """All stage-3 weights materialized (e.g. to save the model; frozen=False: the trainable ones only, e.g.
    for an adapter); every rank must enter it."""
    for b in opt.buckets + (opt.frozen if frozen else []):
        if b.sharded:
            gather(b)
    try:
        yield
    finally:
        for b in opt.buckets + opt.frozen:
            free(b)
