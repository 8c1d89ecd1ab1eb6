"""GPU checks of quant/ for a lent H100/H200, run by bench/gpu_check.sh in one call. Prints markdown tables.

1. our kernel vs the torch path, bit-exact, on fresh random inputs with a NaN-poisoned output buffer;
2. kernel GB/s (CUDA events) vs a measured device-to-device copy of the output size (goal >= 85%), and vs
   bitsandbytes' dequantize_4bit when a wheel was carried;
3. QLoRA training step tokens/s and peak memory on a ~1B random-init llama, ours vs HF + PEFT + bitsandbytes
   (the HF side runs in a subprocess outside the repo, since our peft/ shadows HF's).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
from peft.lora import LoraConfig  # noqa: E402
from quant import cuda, qlora  # noqa: E402
from quant.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_bit_exact():
    g = torch.Generator(device="cuda").manual_seed(int(time.time()))  # fresh inputs on every run
    rows = []
    for shape, bs in [((4096, 4096), 64), ((11008, 4096), 64), ((1001, 333), 32), ((7,), 4096), ((70001,), 256)]:
        for dq in (False, True):
            w = torch.randn(shape, device="cuda", generator=g) * torch.rand(1, device="cuda", generator=g)
            packed, state = quantize_nf4(w, bs, dq)
            for name, dt in DT.items():
                out = torch.full(shape, float("nan"), dtype=dt, device="cuda")
                cuda.kernel_dequantize(packed, state, dt, out=out)
                ok = torch.equal(out, dequantize_nf4(packed, state, dt))
                rows.append((f"{list(shape)} bs{bs}{' dq' if dq else ''} {name}", ok))
    print("| bit-exact vs torch path (poisoned output) | result |\n|---|---|")
    for r, ok in rows:
        print(f"| {r} | {'equal' if ok else 'DIFFERENT'} |")
    return all(ok for _, ok in rows)


def time_ms(fn, iters=50):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


BNB_TIMER = """
import json, sys, torch
import bitsandbytes.functional as F
res = {}
for rows, cols in json.loads(sys.argv[1]):
    w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    for dq in (False, True):
        p, s = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        for _ in range(5): F.dequantize_4bit(p, s)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(); a.record()
        for _ in range(50): F.dequantize_4bit(p, s)
        b.record(); torch.cuda.synchronize()
        res[f"{rows}x{cols}{' dq' if dq else ''}"] = a.elapsed_time(b) / 50
print(json.dumps(res))
"""


def run_outside_repo(code: str, *args) -> str:
    """python -P in a temp cwd (so HF's peft is imported, not ours), PYTHONPATH kept for carried wheels."""
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-P", "-c", code, *args], cwd=d, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return r.stdout.strip().splitlines()[-1]


def bench_bandwidth(have_bnb: bool):
    shapes = [(4096, 4096), (16384, 16384)]  # the second is far larger than L2 (50-60 MB)
    bnb = json.loads(run_outside_repo(BNB_TIMER, json.dumps(shapes))) if have_bnb else {}
    print("\n| dequant -> bf16 | ours ms | ours GB/s | copy GB/s | ours/copy | bnb ms |\n|---|---|---|---|---|---|")
    for rows, cols in shapes:
        w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        src = torch.empty_like(w)
        copy_ms = time_ms(lambda: w.copy_(src))
        copy_gbs = 2 * w.numel() * 2 / copy_ms / 1e6          # bytes read + written
        for dq in (False, True):
            packed, state = quantize_nf4(w, 64, dq)
            out = torch.empty_like(w)
            ms = time_ms(lambda: cuda.kernel_dequantize(packed, state, torch.bfloat16, out=out))
            traffic = packed.numel() + state.absmax.numel() * state.absmax.element_size() + out.numel() * 2
            gbs = traffic / ms / 1e6
            key = f"{rows}x{cols}{' dq' if dq else ''}"
            bnb_ms = f"{bnb[key]:.3f}" if key in bnb else "n/a"
            print(f"| {key} | {ms:.3f} | {gbs:.0f} | {copy_gbs:.0f} | {gbs / copy_gbs:.0%} | {bnb_ms} |")
        del w, src, out


HF_QLORA = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model
path, B, T, steps, dev = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16, device_map=dev)
m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, m.config.vocab_size, (B, T), device=dev)
if dev == "cuda": torch.cuda.reset_peak_memory_stats()
for i in range(steps):
    if i == 2: sync(); t = time.perf_counter()
    loss = m(input_ids=ids, labels=ids).loss
    opt.zero_grad(); loss.backward(); opt.step()
sync()
print(json.dumps({"tok_s": B * T * (steps - 2) / (time.perf_counter() - t),
                  "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")}))
"""


def bench_qlora(have_bnb: bool, dev="cuda", smoke=False, B=4, T=512, steps=8):
    """smoke=True: a 2-layer model on `dev` for a quick dry run of this code path (bench/gpu_check.py --smoke-cpu)."""
    cfg = M.ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                        num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5,
                        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)  # TinyLlama-1.1B's shape
    if smoke:
        cfg = M.ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
        B, T, steps = 1, 16, 3
    on_gpu = dev == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    with tempfile.TemporaryDirectory() as d:
        with torch.device(dev):
            dense = M.Transformer(cfg).to(torch.bfloat16).init_weights(0.02, seed=0)
        M.save_pretrained(dense.cpu(), d)
        del dense
        if on_gpu:
            torch.cuda.empty_cache()
        t = time.perf_counter()
        model = qlora.load_qlora(d, LoraConfig(r=16, alpha=32, targets="all-linear"), dtype=torch.bfloat16,
                                 device=dev).train()
        load_s = time.perf_counter() - t
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=dev)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        for i in range(steps):
            if i == 2:
                sync()
                t = time.perf_counter()
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync()
        ours = {"tok_s": B * T * (steps - 2) / (time.perf_counter() - t),
                "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")}
        del model, opt, logits, loss
        if on_gpu:
            torch.cuda.empty_cache()
        hf = json.loads(run_outside_repo(HF_QLORA, d, str(B), str(T), str(steps), dev)) if have_bnb else None
    size = "tiny smoke model" if smoke else "~1.1B llama"
    print(f"\n| QLoRA r16 all-linear, {size}, B{B}xT{T}, bf16 | tokens/s | peak GiB |\n|---|---|---|")
    path = "CUDA kernel" if on_gpu else "torch path"
    print(f"| nanotune ({path}; load+quantize {load_s:.1f} s) | {ours['tok_s']:.0f} | {ours['peak_gb']:.2f} |")
    if hf:
        print(f"| HF + PEFT + bitsandbytes | {hf['tok_s']:.0f} | {hf['peak_gb']:.2f} |")
    else:
        print("| HF + PEFT + bitsandbytes | n/a (no bitsandbytes wheel carried) | |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-qlora", action="store_true")
    ap.add_argument("--smoke-cpu", action="store_true", help="dry-run the QLoRA section on the CPU, tiny model")
    a = ap.parse_args()
    have_bnb = subprocess.run([sys.executable, "-P", "-c", "import bitsandbytes"], capture_output=True).returncode == 0
    if a.smoke_cpu:
        return bench_qlora(have_bnb, dev="cpu", smoke=True)
    assert torch.cuda.is_available(), "gpu_check needs a CUDA GPU"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    assert cuda.available(), "the NF4 kernel did not build (nvcc?)"
    exact = check_bit_exact()
    bench_bandwidth(have_bnb)
    if not a.skip_qlora:
        bench_qlora(have_bnb)
    sys.exit(0 if exact else 1)


if __name__ == "__main__":
    main()
