"""Helpers for tests/test_dist.py: a tiny model, a fixed data stream, the single-process AdamW reference, and the
ZeRO training loop that every spawned rank runs (the same function runs in-process for world size 1)."""
import os
import socket
import time

import torch
import torch.nn.functional as F
import torch.multiprocessing as mp

import dist
from model import ModelConfig, Transformer, save_pretrained

TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
STEPS, ACCUM, BATCH, SEQ = 20, 2, 8, 12          # global batch of BATCH rows, ACCUM micro-batches per rank
HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
WD, MAX_NORM = 0.1, 1.0


def make_model(tied=True, frozen=False, method=None, moe=False):
    """frozen: like LoRA, most weights frozen (embeddings and MLPs); only attention and norms train.
    method "lora" | "qlora": LoRA r=4 on every linear (qlora: over the NF4 + double-quant base), the rest frozen.
    moe: a tiny Mixtral (4 experts, top-3, in every block) instead of the llama. Top-3: every expert gets tokens;
    with top-2 one rarely routed expert's near-zero gradient lets AdamW amplify float rounding to 1.3e-6 after
    10 steps, in every ZeRO stage alike (measured), which says nothing about sharding."""
    cfg = ModelConfig.from_hf(dict(TINY, model_type="mixtral", num_local_experts=4, num_experts_per_tok=3,
                                   tie_word_embeddings=tied)) if moe else ModelConfig(**dict(TINY, tie_word_embeddings=tied))
    model = Transformer(cfg).init_weights(seed=0)
    for n, p in model.named_parameters():
        p.requires_grad_(not (frozen and ("embed" in n or "mlp" in n)))
    if method:
        import peft
        from quant.linear import quantize_model
        torch.manual_seed(0)  # LoRA's A init: the same on every rank and in the reference
        model = peft.apply(quantize_model(model, double_quant=True) if method == "qlora" else model,
                           peft.LoraConfig(r=4, alpha=8, targets="all-linear"))
    return model


def batches():
    """(STEPS, BATCH, SEQ + 1) fixed token ids: step s trains on batches()[s]."""
    return torch.randint(0, TINY["vocab_size"], (STEPS, BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))


def groups(model):
    """AdamW groups as names: weight decay on matrices only, as train.py would."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [n for n in names if not n.endswith("norm.weight")], "weight_decay": WD},
            {"params": [n for n in names if n.endswith("norm.weight")], "weight_decay": 0.0}]


def loss_fn(model, rows, head_matmul=False):
    """Mean next-token CE. head_matmul: like train.py's chunked loss, read lm_head.weight after
    forward(hidden_only=True) instead of calling lm_head."""
    if head_matmul:
        logits = model(rows[:, :-1], hidden_only=True) @ model.lm_head.weight.T
    else:
        logits = model(rows[:, :-1])                                   # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


def reference(tied=True, frozen=False, steps=STEPS, method=None, moe=False):
    """torch.optim.AdamW + clip_grad_norm_ on the whole global batch, one process: losses, norms, params."""
    model, data = make_model(tied, frozen, method, moe), batches()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([dict(g, params=[params[n] for n in g["params"]]) for g in groups(model)], **HYPER)
    losses, norms = [], []
    for s in range(steps):
        loss = loss_fn(model, data[s])
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params.values(), MAX_NORM).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "params": {n: p.detach().clone() for n, p in params.items()}}


def train_zero(stage, offload=False, start=0, stop=STEPS, load=None, save_at=None, save=None, tied=True,
               bucket_numel=4000, compute_dtype=None, frozen=False, checkpointing=False,
               sum_grads=False, export=None, perturb=False,
               head_matmul=False, method=None, moe=False):
    """The loop train.py runs: this rank's rows of the global batch, ACCUM micro-batches, clip, step.
    sum_grads: divide each rank's loss by the world size and let ZeRO sum (train.py's convention).
    export: save the model (stage 3: gathered) with save_pretrained to this dir after training.
    perturb: ranks other than 0 start from different weights (ZeroOptimizer must broadcast rank 0's).
    Returns losses (global means), norms, rank-0 consolidated params and this rank's memory figures."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model, data = make_model(tied, frozen, method, moe), batches()
    model.gradient_checkpointing = checkpointing
    if perturb and rank > 0:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
    opt = dist.ZeroOptimizer(model, stage, weight_decay=WD, groups=groups(model), offload=offload,
                             offload_threads=1, bucket_numel=bucket_numel, compute_dtype=compute_dtype,
                             average_grads=not sum_grads,
                             **HYPER)
    if load:
        dist.load_checkpoint(opt, load)
    mem = {"initial": opt.memory_bytes()}
    losses, norms, per = [], [], BATCH // world
    for s in range(start, stop):
        rows = data[s][rank * per:(rank + 1) * per]
        total = torch.zeros(())
        for micro in rows.chunk(ACCUM):
            loss = loss_fn(model, micro, head_matmul) / ACCUM
            opt.backward(loss / world if sum_grads else loss)
            total += loss.detach()
        norms.append(opt.clip_grad_norm_(MAX_NORM).item())
        opt.step()
        opt.zero_grad()
        losses.append(dist.all_reduce_mean(total).item())
        if save_at is not None and s + 1 == save_at:
            dist.save_checkpoint(opt, save)
    mem.update(final=opt.memory_bytes(), peak=dict(opt.peak), padded=opt.padded_numel,
               shards=[b.shard_numel for b in opt.buckets], numels=[b.numel for b in opt.buckets],
               owned=sum(e - a for _, a, e, _ in opt.segments),
               # stage 3's frozen base, measured on the model's tensors: their storages (freed between steps)
               frozen_live=sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in
                                frozen_tensors(model)}.values()),
               frozen_flats=[(b.names[0], b.numel, b.padded, b.shard_param.nbytes, b.full.element_size())
                             for b in opt.frozen])
    if export:
        with dist.gathered_params(opt):
            if rank == 0:
                save_pretrained(model, export)
    compute = {n: p.detach().clone() for n, p in model.named_parameters()} if stage < 3 else None
    return {"losses": losses, "norms": norms, "params": dist.consolidated_params(opt), "mem": mem,
            "compute": compute}


def ledger_step(stage, method=None, tied=True):
    """One step of plain data parallel (stage 0: AllReduceAdamW) or ZeRO; -> this rank's ledger prediction and
    the bytes measured on its tensors (dist/ledger.py)."""
    from dist import ledger
    world, rank = dist.get_world_size(), dist.get_rank()
    model = make_model(tied, method=method)
    opt = dist.AllReduceAdamW(model, groups(model), **HYPER) if stage == 0 else \
        dist.ZeroOptimizer(model, stage, groups=groups(model), bucket_numel=4000, **HYPER)
    rows = batches()[0][rank::world]
    opt.backward(loss_fn(model, rows))
    opt.clip_grad_norm_(MAX_NORM)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"predicted": ledger.predict(model, stage, world, rank, 4, 4000), "measured": ledger.measure(model, opt)}


def frozen_tensors(model) -> list:
    """The frozen parameters and buffers (NF4 codes, scales) of a model, deduplicated."""
    ts = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    return list({id(t): t for t in ts}.values())


def frozen_bytes(model) -> int:
    """Bytes of the frozen parameters and NF4 buffers (RoPE buffers excluded: none here), whole model."""
    return sum(t.nbytes for t in frozen_tensors(model))


def _worker(rank, world, port, jobs, outdir, timeout_s):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_distributed(timeout_s=timeout_s, threads=1)
    for name, fn, kwargs in jobs:
        result = fn(**kwargs)
        torch.save(result, os.path.join(outdir, f"{name}.rank{rank}.pt"))
    dist.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world, jobs, outdir, timeout_s=60.0, deadline_s=300.0):
    """Run `jobs` [(name, fn, kwargs)] on `world` spawned ranks; returns (exit codes, seconds).
    Processes are joined one by one with a deadline, so a survivor that hangs is seen (and killed) as a hang."""
    ctx = mp.start_processes(_worker, args=(world, free_port(), jobs, outdir, timeout_s), nprocs=world,
                             join=False, start_method="spawn")
    t0 = time.time()
    for p in ctx.processes:
        p.join(max(0.0, deadline_s - (time.time() - t0)))
    codes = [p.exitcode for p in ctx.processes]
    for p in ctx.processes:
        if p.exitcode is None:
            p.kill()
            p.join()
    return codes, time.time() - t0


def die_or_hang(mode):
    """Rank 1 dies (or stops issuing collectives); rank 0 keeps all-reducing and must fail, not hang."""
    import torch.distributed as tdist
    tdist.barrier()
    if tdist.get_rank() == 1:
        if mode == "die":
            os._exit(7)
        time.sleep(6)
    x = torch.ones(4)
    for _ in range(1000):
        tdist.all_reduce(x)
        time.sleep(0.01)
