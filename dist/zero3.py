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
    """Installs the forward/backward hooks that gather and free each module's units."""

    def __init__(self, opt, model):
        self.opt = opt
        modules = unit_modules(model)
        uses = []  # per module: the sharded buckets whose parameters it uses
        for m in modules:
            bis = {opt.where[id(p)][0] for p in m.parameters() if id(p) in opt.where}
            uses.append([opt.buckets[i] for i in sorted(bis) if opt.buckets[i].sharded])
        last = {id(b): i for i, bs in enumerate(uses) for b in bs}  # the unit's last user in forward
        # The final norm also gathers the LM head: a chunked loss (train.py) reads lm_head.weight after
        # forward(hidden_only=True) without calling lm_head. Backward or the end of backward frees it then.
        uses[-2] = uses[-2] + [b for b in uses[-1] if b not in uses[-2]]
        for i, (m, bs) in enumerate(zip(modules, uses)):
            if bs:
                frees = [b for b in bs if last[id(b)] == i]
                m.register_forward_pre_hook(lambda mod, args, bs=bs: self._gather(bs))
                m.register_forward_hook(lambda mod, args, out, bs=bs, frees=frees: self._after(bs, frees, out))

    def _gather(self, buckets):
        with torch.no_grad():
            for b in buckets:
                gather(b)
        held = sum(b.full.untyped_storage().nbytes() for b in self.opt.buckets if b.sharded)
        self.opt.peak["params"] = max(self.opt.peak["params"], held)

    def _backward_hook(self, buckets):
        def hook(grad):
            self.opt._in_backward = True
            self._gather(buckets)
        return hook

    def _after(self, buckets, frees, out):
        outs = out if isinstance(out, (tuple, list)) else [out]
        for t in outs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(self._backward_hook(buckets))
        if not self.opt._in_backward:  # recomputation (gradient checkpointing) runs inside backward
            for b in frees:
                free(b)


@contextlib.contextmanager
def gathered_params(opt):
    """All stage-3 weights materialized (e.g. to save the model); every rank must enter it."""
    for b in opt.buckets:
        if b.sharded:
            gather(b)
    try:
        yield
    finally:
        for b in opt.buckets:
            free(b)
