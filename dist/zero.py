"""ZeRO-1/2/3 sharded AdamW over torch.distributed (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models"), with ZeRO-Offload's CPU step (Ren et al. 2021).

Mixed-precision Adam keeps 16 bytes per parameter: 2 (bf16 weights) + 2 (bf16 gradients) + 12 (fp32 master
weights, Adam m and v). With N ranks the paper's per-rank bytes for Psi parameters are
    stage 1 (optimizer state partitioned):   4 Psi + 12 Psi / N
    stage 2 (+ gradients partitioned):       2 Psi + 14 Psi / N
    stage 3 (+ parameters partitioned):             16 Psi / N
We keep the reduced gradient shard in fp32 (exact accumulation over micro-batches, and fused AdamW needs the
gradient in the master dtype), so ours is 4 Psi + 16 Psi/N, 2 Psi + 16 Psi/N and 18 Psi/N (`predicted_bytes`).

Every trainable parameter lives in a flat padded bucket (bucket.py); rank r owns slice r of each bucket and keeps
only that slice's fp32 master weights and AdamW state. The update is torch.optim.AdamW itself, run on per-group
segments of the master shards, so the math is AdamW's. Every rank issues the same collectives in the same order:
buckets are reduced strictly in bucket order, and a bucket whose parameters got no gradient is reduced as zeros.

Use (every rank):  opt = ZeroOptimizer(model, stage=2, lr=...)
                   for each micro-batch: opt.backward(loss / accum)
                   opt.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()
"""
import collections
import contextlib
import functools
import os

import torch
import torch.distributed as dist

from . import zero3
from .bucket import Bucket, collective
from .checkpoint import load_checkpoint, save_checkpoint
from .ddp import ZERO_FILE


def predicted_bytes(stage: int, psi: int, world: int, compute_bytes: int = 2) -> dict:
    """Per-rank bytes of each state kind for psi (padded) trainable parameters, between steps."""
    b = compute_bytes
    return {"params": b * psi // (world if stage == 3 else 1),
            "grads": (b * psi if stage == 1 else 0) + 4 * psi // world,
            "master": 4 * psi // world, "optim": 8 * psi // world}


def plan_buckets(model, named, stage: int, bucket_numel: int) -> list[tuple[list[str], bool]]:
    """Buckets as (trainable param names, sharded): stage 3 one per unit (zero3.plan_units), else runs of
    about bucket_numel elements in reverse registration order (~ the order gradients become ready)."""
    if stage == 3:
        return zero3.plan_units(model, named)
    plan, cur, size = [], [], 0
    for n, p in reversed(named):
        if cur and size + p.numel() > bucket_numel:
            plan.append((cur, False))
            cur, size = [], 0
        cur.append(n)
        size += p.numel()
    return plan + [(cur, False)]


@contextlib.contextmanager
def num_threads(n: int | None):
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class ZeroOptimizer:
    """ZeRO stage 1, 2 or 3 AdamW over the model's trainable parameters (full fine-tuning, LoRA, QLoRA...).

    groups: optional list of dicts {"params": [param names], **AdamW overrides (lr, weight_decay, ...)};
      every trainable parameter in exactly one group. Default: one group.
    offload: fp32 master weights, gradient shard and AdamW state in CPU memory; fused AdamW steps there with
      `offload_threads` threads (torchrun sets OMP_NUM_THREADS=1).
    compute_dtype: dtype of the model's weights in forward/backward (e.g. torch.bfloat16); masters stay fp32.
    bucket_numel: stage 1/2 bucket size in elements (stage 3 buckets are the model's blocks).
    average_grads: divide the summed gradients by the world size (DDP's mean); False when each rank's loss is
      already divided by the global token count (train.py), so the plain sum is the gradient."""

    def __init__(self, model, stage: int, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, groups: list[dict] | None = None, offload: bool = False,
                 offload_threads: int | None = None, compute_dtype: torch.dtype | None = None,
                 bucket_numel: int = 1 << 24, max_inflight: int = 1,
                 average_grads: bool = True):
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage!r} (stage 0 = plain DDP, not this class)")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("ZeroOptimizer: the model has no trainable parameters")
        self.stage, self.offload, self.max_inflight, self.average = stage, offload, max_inflight, average_grads
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = named[0][1].device
        self.dtype = compute_dtype or named[0][1].dtype
        self.master_device = torch.device("cpu") if offload else self.device
        self.threads = offload_threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        hyper, group_of = self._groups(named, groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.names = [n for n, _ in named]

        self.bucket_numel = bucket_numel  # the ledger (dist/ledger.py) re-plans the buckets from it
        # a model from dist/sharded_load.py holds no base weights yet: each rank reads its own shards from the files
        self.source = getattr(model, "sharded_source", None)
        if self.source is not None and stage != 3:
            raise ValueError("a model built for sharded loading needs ZeRO stage 3")
        plan = plan_buckets(model, named, stage, bucket_numel)
        params = dict(named)
        self.buckets = [Bucket(ns, [params[n] for n in ns], [group_of[n] for n in ns], self.world, self.rank, sh)
                        for ns, sh in plan]
        self.where = {}  # id(param) -> (bucket index, index in bucket)
        for bi, b in enumerate(self.buckets):
            self._init_bucket(b)
            for i, p in enumerate(b.params):
                self.where[id(p)] = (bi, i)
                if stage >= 2:
                    p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, bi, i))
        # a second process group for gradient reduce-scatters, so their order never interleaves with stage 3's
        # parameter all-gathers differently on different ranks
        self.rs_group = dist.new_group() if dist.is_initialized() and stage >= 2 else None

        # AdamW over segments: leaf views of the master shards (one per bucket and group) with gradient views
        self.segments = []  # (bucket, start, end, tensor)
        seg_groups = [dict(h, params=[]) for h in hyper]
        for b in self.buckets:
            for g, a, e in b.segments():
                seg = b.master[a - b.lo:e - b.lo].detach().requires_grad_(True)
                seg.grad = b.grad[a - b.lo:e - b.lo]
                seg_groups[g]["params"].append(seg)
                self.segments.append((b, a, e, seg))
        fused = True if offload or self.device.type == "cuda" else None  # fused: one kernel for all segments
        self.optimizer = torch.optim.AdamW(seg_groups, fused=fused)
        self.step_count, self._reduced, self._next, self._in_backward = 0, False, 0, False
        self._pending, self._staged = collections.deque(), []
        self.peak = {"grads": 0, "params": 0, "frozen": 0}  # transient bytes: backward / stage 3 gathers
        # stage 3 partitions the frozen tensors (LoRA/QLoRA's base) too: gathered with their unit, never reduced
        self.frozen = zero3.shard_frozen(model, self.world, self.rank, self.source) if stage == 3 else []
        if self.source is not None:
            self.source.load_rest(model)
        if stage == 3:
            self.gatherer = zero3.Gatherer(self, model)

    @staticmethod
    def _groups(named, groups, defaults):
        names = [n for n, _ in named]
        groups = groups or [{"params": names}]
        group_of = {}
        for g, spec in enumerate(groups):
            for n in spec["params"]:
                if n in group_of:
                    raise ValueError(f"parameter {n!r} is in optimizer groups {group_of[n]} and {g}")
                group_of[n] = g
        unknown, missing = set(group_of) - set(names), [n for n in names if n not in group_of]
        if unknown or missing:
            raise ValueError(f"optimizer groups: unknown {sorted(unknown)[:3]}, missing trainable {missing[:3]}")
        hyper = [dict(defaults, **{k: v for k, v in spec.items() if k != "params"}) for spec in groups]
        return hyper, group_of

    @torch.no_grad()
    def _init_bucket(self, b: Bucket):
        src = self.source if self.source is not None and self.source.covers(b.params) else None
        if src is not None and b.sharded:  # sharded loading: this rank reads its slice only, from the files
            b.master = src.dense(b, torch.float32).to(self.master_device)
            b.full = torch.empty(b.padded, dtype=self.dtype, device=self.device)  # freed below, never written
        else:
            if src is not None:  # the never-freed unit: whole, from the files on every rank
                flat = src.dense(b, torch.float32, whole=True)
            else:
                flat = b.flatten([p.detach() for p in b.params], torch.float32, self.device)  # (padded,)
                if dist.is_initialized():  # like DDP: every rank starts from rank 0's weights
                    dist.broadcast(flat, src=0)
            b.master = flat[b.lo:b.hi].to(self.master_device, copy=True)
            b.full = flat.to(self.dtype, copy=True)
        b.grad = torch.zeros(b.shard_numel, dtype=torch.float32, device=self.master_device)
        if self.offload and torch.cuda.is_available():  # pinned host memory: async copies
            b.master, b.grad = b.master.pin_memory(), b.grad.pin_memory()
        for p, v in zip(b.params, b.views(b.full)):
            p.data = v  # the model's weights now live in the flat buffer: gathers write straight into them
        if b.sharded:
            b.shard_param = b.full[b.lo:b.hi].clone() if src is None else \
                b.master.to(self.device, self.dtype, copy=True)
            zero3.free(b)
        if self.stage == 1:  # autograd accumulates in place into these views (micro-batches add up)
            b.flat_grad = torch.zeros(b.padded, dtype=self.dtype, device=self.device)
            for p, v in zip(b.params, b.views(b.flat_grad)):
                p.grad = v

    # ---- backward: stage 2/3 gradients are reduce-scattered bucket by bucket while backward runs ----
    @torch.no_grad()
    def _on_grad(self, bi: int, i: int, p: torch.Tensor):
        b = self.buckets[bi]
        if b.grad_buf is None:  # zeros: a param that gets no gradient in this backward contributes zeros
            b.grad_buf = torch.zeros(b.padded, dtype=self.dtype, device=self.device)
        off = b.offsets[i]
        b.grad_buf[off:off + p.numel()].copy_(p.grad.reshape(-1))
        self.peak["grads"] = max(self.peak["grads"], self._transient_grad_bytes() + p.grad.nbytes)
        p.grad = None  # a rank never holds the full gradient: at most a few buckets of it
        b.ready += 1
        if b.ready == len(b.params):
            if b.sharded:  # no backward node needs these weights once all their gradients are in
                for f in [b, *b.free_with]:  # (nor the unit's frozen ones, when its input needs no gradient)
                    zero3.free(f)
            self._launch_ready()

    def _launch_ready(self):
        """Reduce complete buckets strictly in bucket order, so every rank issues the same sequence."""
        bs = self.buckets
        while self._next < len(bs) and bs[self._next].ready == len(bs[self._next].params):
            self._launch(bs[self._next])

    def _transient_grad_bytes(self) -> int:
        live = {id(b.grad_buf): b.grad_buf.nbytes for b in self.buckets if b.grad_buf is not None}
        live.update({id(t): t.nbytes for _, buf, out, _ in self._pending for t in (buf, out)})
        return sum(live.values())

    def _launch(self, b: Bucket):
        if b.grad_buf is None:
            b.grad_buf = torch.zeros(b.padded, dtype=self.dtype, device=self.device)
        out = torch.empty(b.shard_numel, dtype=self.dtype, device=self.device)
        work = collective("reduce_scatter", out, b.grad_buf, self.rs_group, async_op=True)
        self._pending.append((b, b.grad_buf, out, work))
        b.grad_buf = None
        self._next += 1
        while len(self._pending) > self.max_inflight:
            self._complete()

    def _complete(self):
        b, _, out, work = self._pending.popleft()
        if work is not None:
            work.wait()
        if self.master_device == self.device:  # no offload, or a CPU run
            b.grad.add_(out)
        else:  # offload from a GPU: copy to pinned memory without blocking backward; summed in _drain_staged
            if b.staged is None:
                b.staged = torch.empty(b.shard_numel, dtype=self.dtype, pin_memory=True)
            b.staged.copy_(out, non_blocking=True)
            self._staged.append(b)

    def _drain_staged(self):
        if self._staged:
            torch.cuda.current_stream(self.device).synchronize()  # the async device->host copies are done
        for b in self._staged:
            b.grad.add_(b.staged)
        self._staged.clear()

    def backward(self, loss: torch.Tensor):
        """loss.backward(), then reduce what the hooks have not reduced yet (buckets in order, zeros if unused)."""
        loss.backward()
        if self.stage == 1:
            return
        with torch.no_grad():
            while self._next < len(self.buckets):
                self._launch(self.buckets[self._next])
            while self._pending:
                self._complete()
            self._drain_staged()
        for b in self.buckets:
            b.ready = 0
            if b.sharded:
                zero3.free(b)
        for b in self.frozen:  # e.g. LoRA's tied embedding (its lookup needs no backward), unused parameters
            zero3.free(b)
        self._next, self._in_backward = 0, False

    # ---- step ----
    @torch.no_grad()
    def _reduce(self):
        """Sum of gradients over ranks -> mean, in each rank's fp32 shard (stage 1 reduces here, once per step)."""
        if self._reduced:
            return
        self._check_grads()
        for b in self.buckets:
            if self.stage == 1:
                out = torch.empty(b.shard_numel, dtype=self.dtype, device=self.device)
                collective("reduce_scatter", out, b.flat_grad)
                b.grad.copy_(out)
            if self.average:
                b.grad.div_(self.world)
        self._reduced = True

    def _check_grads(self):
        """Catch the two silent misuses: loss.backward() instead of opt.backward() (buckets left unreduced, the
        next backward out of step), and stage 1 .grad views replaced (model.zero_grad(set_to_none=True))."""
        if self._next or self._pending or any(b.ready for b in self.buckets):
            raise RuntimeError("ZeroOptimizer: gradients were not reduced: "
                               "call opt.backward(loss), not loss.backward()")
        for b in self.buckets:
            if b.flat_grad is not None and any(p.grad is None or p.grad.data_ptr() != v.data_ptr()
                                               for p, v in zip(b.params, b.views(b.flat_grad))):
                raise RuntimeError("ZeroOptimizer: a parameter's .grad was replaced (model.zero_grad()?): "
                                   "use opt.zero_grad()")

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over the whole (sharded) gradient: the global L2 norm is the square
        root of the all-reduced sum of the shards' squared norms (padding is zero). Returns the norm."""
        self._reduce()
        # each shard's norm in one fp32 reduction (no fp64 copy of the gradient), squared and summed in fp64
        sq = sum((torch.linalg.vector_norm(b.grad).double() ** 2 for b in self.buckets),
                 torch.zeros((), dtype=torch.float64))
        sq = sq.to(self.device, torch.float32).reshape(1)
        if dist.is_initialized():
            dist.all_reduce(sq)
        norm = sq.sqrt()[0]
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0).to(self.master_device)
        for b in self.buckets:
            b.grad.mul_(coef)
        return norm

    @torch.no_grad()
    def step(self) -> bool:
        self._reduce()
        with num_threads(self.threads if self.offload else None):
            self.optimizer.step()
        self.step_count += 1
        self.publish()
        return True  # always taken (no fp16 loss scaling here)

    @torch.no_grad()
    def publish(self):
        """Copy the updated fp32 master shards into the compute weights (all-gathered unless stage 3)."""
        for b in self.buckets:
            if self.master_device != self.device:  # offload from a GPU: cast INTO the pinned staging buffer, then
                if b.staged is None:  # an async copy (`.to(cuda, bf16)` casts into a pageable temp, then blocks)
                    b.staged = torch.empty(b.shard_numel, dtype=self.dtype, pin_memory=True)
                # free: its backward copies were drained (synchronized) before the step read the gradients
                shard = b.staged.copy_(b.master).to(self.device, non_blocking=True)
            else:
                shard = b.master.to(self.device, self.dtype, non_blocking=True)
            if b.sharded:
                b.shard_param.copy_(shard)
                zero3.free(b)  # a unit left gathered (e.g. by a no-grad forward) must be re-gathered
            else:
                collective("all_gather", b.full, shard)
        for b in self.frozen:  # e.g. the LM head, gathered by a no-grad forward's final norm
            zero3.free(b)

    def zero_grad(self, set_to_none: bool = True):
        """Zero the gradient buffers (they are flat and reused, so `set_to_none` is accepted and ignored)."""
        for b in self.buckets:
            b.grad.zero_()
            if b.flat_grad is not None:
                b.flat_grad.zero_()
        self._reduced = False

    def memory_bytes(self) -> dict:
        """Bytes of the tensors this rank holds now, by kind (compare with predicted_bytes)."""
        params = sum(b.full.untyped_storage().nbytes() + (b.shard_param.nbytes if b.sharded else 0)
                     for b in self.buckets)
        grads = sum(b.grad.nbytes + sum(t.nbytes for t in (b.flat_grad, b.staged) if t is not None)
                    for b in self.buckets)
        grads += sum(p.grad.nbytes for b in self.buckets for p in b.params if self.stage > 1 and p.grad is not None)
        optim = sum(t.nbytes for s in self.optimizer.state.values() for k, t in s.items() if k != "step")
        frozen = sum(b.full.untyped_storage().nbytes() + b.shard_param.nbytes for b in self.frozen)
        return {"params": params, "grads": grads, "master": sum(b.master.nbytes for b in self.buckets),
                "optim": optim, "frozen": frozen}

    @torch.no_grad()
    def finite(self) -> bool:
        """Are all fp32 master weights finite, on every rank? (A collective: every rank calls it.)"""
        bad = torch.tensor([0.0 if all(torch.isfinite(b.master.sum()) for b in self.buckets) else 1.0],
                           device=self.device)
        if dist.is_initialized():
            dist.all_reduce(bad)
        return bad.item() == 0

    def saving(self, model, stream=None, whole: bool = False, extra=None):
        """train.py's final save, streamed under stage 3 (dist/save.py); every rank enters."""
        from .save import saving
        return saving(self, model, stream, whole, extra)

    def gathered(self):
        """A context in which stage 3's weights are whole on every rank (e.g. to save the model); every rank
        enters it. Stages 1 and 2 keep whole weights anyway."""
        return zero3.gathered_params(self)

    # ---- run checkpoints (dist/run.py): one world-size independent file, see checkpoint.py ----
    def save(self, d, rank: int = 0) -> dict:
        """Every rank calls (a collective); rank 0 writes zero.safetensors (fp32 master weights + AdamW
        moments) into checkpoint dir `d`. Returns the state for state.pt (none: it is all in the file)."""
        save_checkpoint(self, d / ZERO_FILE)
        return {"optimizer": None}

    def load(self, d, state: dict):
        if not (d / ZERO_FILE).is_file():
            raise ValueError(f"{d}: written without --zero; resume it without --zero too")
        load_checkpoint(self, d / ZERO_FILE)

    @property
    def param_groups(self) -> list[dict]:
        """AdamW's groups, in the order of `groups` (set "lr" here for a schedule)."""
        return self.optimizer.param_groups

    @property
    def padded_numel(self) -> int:
        return sum(b.padded for b in self.buckets)
