"""GPU check (one NCCL rank): a ZeRO-3 LoRA step and a QLoRA step on a random-init ~8B llama (32 layers, hidden
4096, Llama-3-8B's shapes, bf16 base), printing torch.cuda.max_memory_allocated next to the ledger's prediction
(dist/ledger.py) as markdown rows for bench/RESULTS.md. World size 1: stage 3 saves nothing here; this checks
that the stage-3 paths (gathers, frozen NF4 buckets, hooks) run under NCCL and what one rank's peak is.

    python bench/gpu_zero3.py                  # gpu_check.sh
    python bench/gpu_zero3.py --smoke-cpu      # tiny model, gloo on the CPU (a dry run)
"""
import argparse
import gc
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import dist  # noqa: E402
import peft  # noqa: E402
from dist import ledger  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from quant.linear import quantize_model  # noqa: E402


def step(a, method: str, device) -> str:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
                      num_attention_heads=a.hidden // 128 or 1, num_key_value_heads=max(1, a.hidden // 512),
                      max_position_embeddings=a.seq)
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.device(device):
        model = Transformer(cfg)
    torch.set_default_dtype(torch.float32)
    n = sum(p.numel() for p in model.parameters())
    if method == "qlora":
        model = quantize_model(model, double_quant=True)
    torch.manual_seed(0)
    model = peft.apply(model, peft.LoraConfig(r=16, alpha=32, targets="all-linear"))
    t0 = time.perf_counter()
    opt = dist.ZeroOptimizer(model, 3, lr=1e-4)
    ids = torch.randint(0, a.vocab, (1, a.seq + 1), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(ids[:, :-1])
    opt.backward(F.cross_entropy(logits.float().reshape(-1, a.vocab), ids[:, 1:].reshape(-1)))
    opt.step()
    opt.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    pred = ledger.predict(model, 3, opt.world, opt.rank, opt.dtype.itemsize, opt.bucket_numel)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else ledger.peak_bytes(device)
    return (f"| ZeRO-3 {method}, 1 rank | {a.layers} layers, hidden {a.hidden} (~{n / 1e9:.1f}B) | "
            f"{sum(pred.values()) / 2**30:.2f} GiB predicted between steps | {peak / 2**30:.2f} GiB peak | "
            f"{dt:.1f} s (build of the optimizer + 1 step of {a.seq} tokens) |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--smoke-cpu", action="store_true")
    a = ap.parse_args()
    if a.smoke_cpu:
        a.layers, a.hidden, a.inter, a.vocab, a.seq = 2, 128, 256, 256, 16
    os.environ.update({k: os.environ.get(k, v) for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                                                                 MASTER_ADDR="127.0.0.1", MASTER_PORT="29517").items()})
    env = dist.init_distributed(timeout_s=300)
    print("| run | model | ledger | peak memory | time |\n|---|---|---|---|---|", flush=True)
    for method in ("lora", "qlora"):
        try:
            print(step(a, method, env.device), flush=True)
        except torch.OutOfMemoryError as e:
            print(f"| ZeRO-3 {method}, 1 rank | {a.layers} layers | | CUDA OOM: {str(e).splitlines()[0][:120]} | |")
    dist.cleanup()


if __name__ == "__main__":
    main()
