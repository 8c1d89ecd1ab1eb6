"""The memory ledger: the bytes each rank holds between steps, by kind, predicted from the formulas (ZeRO,
Rajbhandari et al. 2020, section 5: stage 1 partitions the AdamW state, 2 + the gradients, 3 + the weights; here
stage 3 partitions the frozen base too) next to what a rank measures on its tensors, plus its peak memory.

    python -m dist.ledger --model DIR --method lora --zero 3 --world 8 [--offload] [--batch-size 4 --seq-len 2048]

Kinds (Psi trainable elements in buckets of n_i elements, shard S_i = ceil(n_i / N), compute dtype of b bytes):
    frozen   frozen weights in their storage dtype (NF4: codes + absmax + double-quant state); stage 3: per unit
             and kind a shard of ceil(n / (N a)) a elements (a: NF4 codes cut on whole blocks)
    params   trainable weights: stage 0 b Psi; 1, 2: b sum N S_i (padded); 3: b sum S_i
    grads    stage 0: none between steps; 1: b sum N S_i (flat .grad views) + 4 sum S_i; 2, 3: 4 sum S_i (fp32 shard)
    master   fp32 master shard: 4 sum S_i (stage 0: none, the fp32 weights are the master)
    optim    Adam m and v: 8 x the elements this rank owns (padding excluded; stage 0: 8 Psi)
    activations, an estimate only (not measured): Korthikanti et al. 2022 ("Reducing Activation Recomputation in
             Large Transformer Models", eq. 1 without the attention-score term, which SDPA never stores):
             34 s b h bytes per layer in 16-bit, i.e. 17 elements; gradient checkpointing keeps 1 per layer.
The prediction uses the optimizer's own bucket plans (zero.plan_buckets, zero3.plan_frozen) on the model's
shapes: a meta-device model from the CLI, the real one in train.py (`report`, at step 1).
"""
import argparse
import json
import resource

import torch
import torch.distributed as dist

from . import zero3
from .zero import plan_buckets

KINDS = ("frozen", "params", "grads", "master", "optim")


def _frozen_model_tensors(model) -> list[torch.Tensor]:
    ts = [t for *_, t in zero3.frozen_tensors(model)]
    return list({id(t): t for t in ts}.values())


def predict(model, stage: int, world: int, rank: int = 0, compute_bytes: int = 4, bucket_numel: int = 1 << 24,
            cuda_offload: bool = False) -> dict:
    """Per-rank bytes by kind between steps, from the shapes alone (works on a meta-device model)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    psi, b = sum(p.numel() for _, p in named), compute_bytes
    if stage == 3:
        frozen = 0
        for _, items, align in zero3.plan_frozen(model):
            n = sum(t.numel() for *_, t in items)
            frozen += -(-n // (world * align)) * align * items[0][2].element_size()
    else:
        frozen = sum(t.numel() * t.element_size() for t in _frozen_model_tensors(model))
    if stage == 0:  # AllReduceAdamW: the fp32 weights are the master, .grad is None between steps
        return {"frozen": frozen, "params": b * psi, "grads": 0, "master": 0, "optim": 8 * psi}
    sizes = dict((n, p.numel()) for n, p in named)
    out = {"frozen": frozen, "params": 0, "grads": 0, "master": 0, "optim": 0}
    for names, sharded in plan_buckets(model, named, stage, bucket_numel):
        n = sum(sizes[k] for k in names)
        s = -(-n // world)
        out["params"] += b * (s if sharded else s * world)
        out["grads"] += 4 * s + (b * s * world if stage == 1 else 0) + (b * s if cuda_offload else 0)
        out["master"] += 4 * s
        out["optim"] += 8 * max(0, min(n, (rank + 1) * s) - rank * s)
    return out


def measure(model, optimizer) -> dict:
    """The bytes of the tensors this rank holds now, by kind (ZeroOptimizer.memory_bytes, or AllReduceAdamW's)."""
    shards = [b.shard_param for b in getattr(optimizer, "frozen", [])]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in _frozen_model_tensors(model) + shards}
    frozen = sum(v for k, v in storages.items() if k)  # a freed stage-3 storage has no data
    if hasattr(optimizer, "memory_bytes"):
        return dict(optimizer.memory_bytes(), frozen=frozen)
    params = [p for g in optimizer.optimizer.param_groups for p in g["params"]]
    optim = sum(t.nbytes for s in optimizer.optimizer.state.values() for k, t in s.items() if k != "step")
    return {"frozen": frozen, "params": sum(p.nbytes for p in params),
            "grads": sum(p.grad.nbytes for p in params if p.grad is not None), "master": 0, "optim": optim}


def peak_bytes(device) -> int:
    """CUDA max_memory_allocated, else this process's peak RSS (Linux ru_maxrss is in KiB)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc/self/statm), 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def activations(cfg, batch: int, seq: int, elem_bytes: int, checkpointing: bool) -> int:
    """Estimated saved activations of one micro-batch (see the module docstring)."""
    per_layer = batch * seq * cfg.hidden_size * elem_bytes
    return per_layer * (cfg.num_hidden_layers + 17 if checkpointing else 17 * cfg.num_hidden_layers)


def report(model, optimizer, stage: int, world: int, rank: int, device, out=None, quiet: bool = False):
    """Every rank calls (a collective): each rank's prediction, measurement and peak; rank 0 prints one line
    per rank (unless quiet) and writes `out`/memory.json (if given). Returns the per-rank records on rank 0."""
    dtype = optimizer.dtype if hasattr(optimizer, "dtype") else next(iter(
        p for g in optimizer.optimizer.param_groups for p in g["params"])).dtype
    offload = bool(getattr(optimizer, "offload", False)) and torch.device(device).type == "cuda"
    bucket = getattr(optimizer, "bucket_numel", 1 << 24)
    rec = {"rank": rank, "predicted": predict(model, stage, world, rank, dtype.itemsize, bucket, offload),
           "measured": measure(model, optimizer), "peak": peak_bytes(device), "rss": rss_bytes()}
    recs = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(recs, rec)
    else:
        recs = [rec]
    if rank != 0:
        return None
    for r in recs if not quiet else []:
        p, m = r["predicted"], r["measured"]
        print(f"memory rank {r['rank']} (MB, predicted/measured): " + ", ".join(
            f"{k} {p[k] / 1e6:.2f}/{m[k] / 1e6:.2f}" for k in KINDS) + f", total {sum(p.values()) / 1e6:.2f}/"
            f"{sum(m[k] for k in KINDS) / 1e6:.2f}, peak {r['peak'] / 1e6:.1f}, rss now {r['rss'] / 1e6:.1f}", flush=True)
    if out is not None:
        (out / "memory.json").write_text(json.dumps(recs, indent=1) + "\n")
    return recs


def meta_model(path, method: str, lora_r: int = 16):
    """The model of `path` (config.json only) with `method` attached, on the meta device (nothing allocated)."""
    import peft
    from model.io import read_config
    from model.weights import meta_model as build
    model = build(read_config(path))
    if method == "qlora":  # NF4 + double quant stand-ins with the real byte counts (quantizing needs data)
        from .sharded_load import nf4_stand_ins
        nf4_stand_ins(model)
    if method != "full":
        args = {"lora_r": lora_r} if method in ("lora", "qlora", "dora") else {}
        model = peft.apply(model, peft.method_config(method, args, str(path)))
    return model


def main(argv=None):
    import peft
    ap = argparse.ArgumentParser(prog="python -m dist.ledger", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF model dir (only config.json is read)")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--zero", type=int, default=3, choices=(0, 1, 2, 3))
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--offload", action="store_true", help="on a GPU: + the pinned staging copy of each grad shard")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--grad-checkpointing", action="store_true")
    a = ap.parse_args(argv)
    model = meta_model(a.model, a.method, a.lora_r)
    p = predict(model, a.zero, a.world, 0, 4, cuda_offload=a.offload)
    act = activations(peft.unwrap(model).cfg, a.batch_size, a.seq_len, 4, a.grad_checkpointing)
    print(f"{a.model}: --method {a.method} --zero {a.zero} --world {a.world}{' --offload' if a.offload else ''}, "
          f"fp32 weights (train.py; autocast computes in bf16): bytes per rank (rank 0)")
    for k, v in [*p.items(), ("activations (estimate, fp32)", act), ("total", sum(p.values()) + act)]:
        print(f"  {k:30s} {v:>16,d}  {v / 2**30:8.3f} GiB")


if __name__ == "__main__":
    main()
