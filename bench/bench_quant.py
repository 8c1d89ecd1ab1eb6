"""CPU benchmark of quant/: dequant speed (ours vs bitsandbytes' C++ CPU kernel), SmolLM2 weight bytes in
fp32 / bf16 / NF4 / NF4+DQ (measured vs predicted), QLoRA vs LoRA peak RSS and step time.

    python bench/bench_quant.py            # prints markdown tables (copied into docs/quant.md)

bitsandbytes is a dev-only reference: it runs in a subprocess (tests/reference.py). Each training measurement
also runs in its own subprocess so that peak RSS (ru_maxrss) belongs to that workload alone.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from quant.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402
from tests.reference import run_reference  # noqa: E402

THREADS = 2


def median_ms(fn, reps=5):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]


def bench_dequant():
    torch.set_num_threads(THREADS)
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)).bfloat16()
    rows = []
    for dq in (False, True):
        packed, state = quantize_nf4(w, 64, dq)
        rows.append((f"ours, torch path{' + DQ' if dq else ''}",
                     median_ms(lambda: dequantize_nf4(packed, state, torch.bfloat16))))
    with tempfile.TemporaryDirectory() as d:
        out = run_reference(f"""
            import time
            import bitsandbytes.functional as F
            torch.set_num_threads({THREADS})
            w = load_file("in.safetensors")["w"]
            res = []
            for dq in (False, True):
                p, s = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
                F.dequantize_4bit(p, s)
                ts = []
                for _ in range(5):
                    t = time.perf_counter(); F.dequantize_4bit(p, s); ts.append((time.perf_counter() - t) * 1e3)
                res.append(sorted(ts)[2])
            save_file({{"ms": torch.tensor(res)}}, "out.safetensors")
        """, d, {"w": w})
    rows += [("bitsandbytes CPU (C++)", out["ms"][0].item()), ("bitsandbytes CPU (C++) + DQ", out["ms"][1].item())]
    return rows


def bench_bytes(path):
    """Bytes of the weights as stored in memory, measured on the loaded model, vs the formula."""
    from model import load_pretrained
    from quant.checkpoint import load_nf4
    from quant.linear import NF4Linear
    dense = load_pretrained(path)
    n_lin = sum(m.weight.numel() for n, m in dense.named_modules()
                if isinstance(m, torch.nn.Linear) and n != "lm_head")
    n_all = sum(p.numel() for p in dense.parameters())       # tied embeddings counted once
    n_layers = sum(1 for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    del dense
    rows = [("fp32", 4 * n_all, 4 * n_all), ("bf16", 2 * n_all, 2 * n_all)]
    for dq in (False, True):
        m = load_nf4(path, dtype=torch.bfloat16, quantize=True, double_quant=dq)
        seen, measured = set(), 0
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                measured += t.numel() * t.element_size()
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if dq else 4 / 64)   # codes + absmax (+ nested absmax)
        predicted = per_param * n_lin + 2 * (n_all - n_lin) + (4 * n_layers if dq else 0)  # + one offset/layer
        assert all(isinstance(x, NF4Linear) for n, x in m.named_modules() if n.endswith("_proj"))
        rows.append((f"NF4{' + DQ' if dq else ''} (linears), bf16 rest", measured, predicted))
    return rows, n_lin, n_all


TRAIN = """
import resource, sys, time, torch
sys.path.insert(0, {root!r})
import peft
from peft.lora import LoraConfig
from model import load_pretrained
from quant import qlora
torch.set_num_threads({threads})
torch.manual_seed(0)
cfg = LoraConfig(r=8, alpha=16, targets="all-linear")
if {method!r} == "qlora":
    model = qlora.load_qlora({path!r}, cfg)
else:
    model = peft.apply(load_pretrained({path!r}), cfg)
model.train()
load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, 49152, ({B}, {T} + 1), generator=torch.Generator().manual_seed(0))
ts = []
for step in range(3):
    t = time.perf_counter()
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
    ts.append(time.perf_counter() - t)
print(json.dumps({{"step_s": sum(ts[1:]) / 2, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "load_rss_mb": load_rss / 1024, "loss": loss.item()}}))
"""


def bench_train(path, B=4, T=128):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for method in ("lora", "qlora"):
        code = "import json\n" + TRAIN.format(root=root, threads=THREADS, method=method, path=str(path), B=B, T=T)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        rows.append((method, json.loads(r.stdout.strip().splitlines()[-1])))
    return rows


def main():
    from model.gguf import default_model
    path = default_model()
    print(f"machine: {os.cpu_count()} CPU cores (torch threads {THREADS}), torch {torch.__version__}\n")
    print("| dequantize 4096x4096 NF4 -> bf16 (blocksize 64) | ms (median of 5) |\n|---|---|")
    for name, ms in bench_dequant():
        print(f"| {name} | {ms:.1f} |")
    rows, n_lin, n_all = bench_bytes(path)
    print(f"\nSmolLM2-135M: {n_all:,} params, {n_lin:,} in the 210 quantizable linears (lm_head is tied to "
          f"the embeddings and stays dense)\n")
    print("| weights | measured MB | predicted MB | bytes/param (all) |\n|---|---|---|---|")
    for name, measured, predicted in rows:
        print(f"| {name} | {measured / 1e6:.1f} | {predicted / 1e6:.1f} | {measured / n_all:.3f} |")
    print("\n| SmolLM2-135M, LoRA r8 all-linear, B4xT128, fp32 compute | step s | tokens/s | peak RSS MB | "
          "RSS after load MB |\n|---|---|---|---|---|")
    for method, r in bench_train(path):
        print(f"| {method} | {r['step_s']:.2f} | {4 * 128 / r['step_s']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['load_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
