"""CPU bench, 2 gloo processes: per-rank memory of ZeRO-1/2/3 (predicted vs measured tensor bytes) and step time
of ZeRO-1/2/3 +/- offload vs plain DDP (torch DistributedDataParallel + torch.optim.AdamW), medians.

    python bench/bench_dist.py [--steps 8] [--layers 4] [--hidden 256]
Prints a markdown table (rank 0). Memory is measured on the tensors each rank holds, not RSS.
"""
import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import dist  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

CONFIGS = [("ddp", 0, False)] + [(f"zero{s}{'+offload' if o else ''}", s, o) for s in (1, 2, 3) for o in (False, True)]
MB = 1 / 2 ** 20


def make_model(a):
    cfg = ModelConfig(vocab_size=8192, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                      num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=a.seq, tie_word_embeddings=True)
    return Transformer(cfg).init_weights(seed=0)


def loss_fn(model, rows):
    logits = model(rows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


def run(name, stage, offload, a, rank):
    model = make_model(a)
    g = torch.Generator().manual_seed(rank)
    data = torch.randint(0, 8192, (a.steps + 2, a.batch, a.seq + 1), generator=g)
    if stage == 0:
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    else:
        opt = dist.ZeroOptimizer(model, stage, lr=1e-4, weight_decay=0.1, offload=offload, offload_threads=1,
                                 bucket_numel=1 << 18)
    times = []
    for s in range(a.steps + 2):  # 2 warm-up steps
        tdist.barrier()
        t0 = time.perf_counter()
        if stage == 0:
            loss_fn(ddp, data[s]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        else:
            opt.backward(loss_fn(model, data[s]))
            opt.clip_grad_norm_(1.0)
            opt.step()
        times.append(time.perf_counter() - t0)
        if stage == 0 and s == a.steps + 1:  # measure before zero_grad: DDP keeps its grads (bucket views)
            mem = {"params": sum(p.nbytes for p in model.parameters()),
                   "grads": sum(p.grad.nbytes for p in model.parameters() if p.grad is not None),
                   "master": 0, "optim": sum(t.nbytes for st in opt.state.values() for k, t in st.items()
                                             if k != "step")}
        opt.zero_grad()
    psi = sum(p.numel() for p in model.parameters())
    if stage == 0:
        pred = {"params": 4 * psi, "grads": 4 * psi, "master": 0, "optim": 8 * psi}
        peak = {"grads": 0, "params": 0}
    else:
        mem, peak = opt.memory_bytes(), opt.peak
        pred = dist.predicted_bytes(stage, opt.padded_numel, tdist.get_world_size(), compute_bytes=4)
    return {"name": name, "ms": 1000 * statistics.median(times[2:]), "mem": mem, "pred": pred, "peak": peak,
            "psi": psi}


def worker(rank, world, port, a):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_distributed(timeout_s=300, threads=a.threads)
    rows = [run(name, s, o, a, rank) for name, s, o in CONFIGS]
    if rank == 0:
        ddp = rows[0]["ms"]
        print(f"\nmodel: {rows[0]['psi'] / 1e6:.2f}M params fp32, {a.layers} layers, hidden {a.hidden}, "
              f"batch {a.batch}x{a.seq} per rank, {world} gloo ranks x {a.threads} thread(s), {a.steps} steps\n")
        print("| config | params MB pred/meas | grads MB pred/meas (+peak transient) | master MB pred/meas | "
              "AdamW state MB pred/meas | total MB pred/meas | step ms (median) | vs DDP |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            p, m = r["pred"], r["mem"]
            cell = lambda k: f"{p[k] * MB:.2f} / {m[k] * MB:.2f}"  # noqa: E731
            print(f"| {r['name']} | {cell('params')} (+{r['peak']['params'] * MB:.2f}) | {cell('grads')} "
                  f"(+{r['peak']['grads'] * MB:.2f}) | {cell('master')} | {cell('optim')} | "
                  f"{sum(p.values()) * MB:.2f} / {sum(m.values()) * MB:.2f} | {r['ms']:.0f} | {r['ms'] / ddp:.2f}x |")
    dist.cleanup()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, a), nprocs=2)


if __name__ == "__main__":
    main()
