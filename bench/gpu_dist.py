"""GPU check (one GPU, no process group): ZeRO-Offload trains a random-init model that does not fit without it.

Full fine-tuning with mixed-precision AdamW needs ~18 bytes/param on the GPU here (bf16 weights + fp32 masters,
gradient shard and Adam moments); with --offload only the bf16 weights (2 bytes/param) and a few gradient
buckets stay on the GPU, and the fp32 step runs on the CPU (fused AdamW). The default ~5.1B-param llama needs
~92 GB without offload (does not fit an 80 GB card) and ~10 GB + activations with it (~82 GB of host RAM).

Needs an 80 GB card (H100): on a 139 GB H200 a model too big for it without offload (> 7.7B) would need
> 139 GB of host RAM with offload (18 bytes/param: fp32 master, grad, m, v + a bf16 staging copy).

    python bench/gpu_dist.py                       # both attempts, prints a markdown row per attempt
    python bench/gpu_dist.py --layers 2 --steps 2  # quick smoke test
    python bench/gpu_dist.py --layers 12 --mem-fraction 0.3   # gpu_check.sh: ~2.7B params under a ~42 GB cap
--mem-fraction caps this process's GPU memory (torch.cuda.set_per_process_memory_fraction), so an H200 shows the
offload-fits-where-plain-does-not result with a model whose ~16 bytes/param of pinned host memory fits its host.
Called from bench/gpu_check.sh; not run by CI (no GPU there).
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
from model import ModelConfig, Transformer  # noqa: E402


def attempt(a, offload: bool) -> str:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = ModelConfig(vocab_size=32000, hidden_size=a.hidden, intermediate_size=a.inter,
                      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 128,
                      num_key_value_heads=a.hidden // 128, max_position_embeddings=a.seq)
    model = opt = None
    try:
        with torch.device("cuda"):
            model = Transformer(cfg).to(torch.bfloat16)  # random init (torch's defaults), built on the GPU
        model.gradient_checkpointing = True
        psi = sum(p.numel() for p in model.parameters())
        opt = dist.ZeroOptimizer(model, 2, lr=1e-5, weight_decay=0.1, offload=offload,
                                 offload_threads=a.threads, bucket_numel=1 << 25)
        data = torch.randint(0, cfg.vocab_size, (a.steps, a.batch, a.seq + 1), device="cuda")
        times = []
        for s in range(a.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = model(data[s, :, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), data[s, :, 1:].reshape(-1))
            opt.backward(loss)
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            print(f"  step {s}: loss {loss.item():.4f} {times[-1]:.2f}s", flush=True)
        steady = sorted(times[1:] or times)[len(times[1:] or times) // 2]
        result = (f"{a.batch * a.seq / steady:.0f} tokens/s, step {steady:.2f}s, GPU peak "
                  f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    except torch.cuda.OutOfMemoryError:
        psi = sum(p.numel() for p in model.parameters()) if model is not None else 0
        result = f"CUDA out of memory (GPU peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)"
    del model, opt
    return (f"| {psi / 1e9:.2f}B llama full FT, bf16 + fp32 AdamW, ZeRO-2 world 1 | offload={offload} | "
            f"{a.batch}x{a.seq} | {result} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--only-offload", action="store_true", help="skip the attempt without offload")
    ap.add_argument("--mem-fraction", type=float, default=0.0, help="cap GPU memory to this fraction (0: none)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_dist.py needs CUDA")
    if a.mem_fraction:
        torch.cuda.set_per_process_memory_fraction(a.mem_fraction)
        print(f"GPU memory capped at {a.mem_fraction:.0%}")
    print(f"device: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    rows = [] if a.only_offload else [attempt(a, offload=False)]
    rows.append(attempt(a, offload=True))
    print("| model | offload | batch | result |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
