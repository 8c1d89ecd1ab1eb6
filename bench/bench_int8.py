"""CPU benchmark of quant/int8.py on SmolLM2-135M: LLM.int8 weight bytes (measured vs predicted), and LoRA step time
and peak RSS of LoRA on the int8 base (--method lora8) vs LoRA on the fp32 base vs HF transformers + PEFT +
bitsandbytes 8-bit (load_in_8bit, llm_int8_threshold 6.0, its CPU path), in alternating rounds.

    python bench/bench_int8.py [--rounds 2] [--device cuda] [--batch 2]   # markdown tables (copied into README.md)

Each training measurement runs in its own fresh process so that peak RSS (ru_maxrss) is that workload's alone;
the HF reference outside the repo (`python -P`, another cwd: our peft/ would shadow HF's). LoRA r8 alpha16 on all
linears, AdamW, B1 x T64 random tokens (bitsandbytes' CPU 8-bit path is slow: ~100 s a step), fp32 compute;
step time: median of steps 2-3 (step 1 warms up).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.reference import run_reference  # noqa: E402

THREADS, B, T, STEPS = 2, 1, 64, 3
DEVICE = "cpu"

LOOP = """
load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, 49152, ({B}, {T} + 1), generator=torch.Generator().manual_seed(0)).to({device!r})
sync = torch.cuda.synchronize if {device!r} == "cuda" else (lambda: None)
ts = []
for step in range({STEPS}):
    sync()
    t = time.perf_counter()
    logits = model(ids[:, :-1])
    logits = getattr(logits, "logits", logits)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
    sync()
    ts.append(time.perf_counter() - t)
res = {{"step_s": statistics.median(ts[1:]), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "load_rss_mb": load_rss / 1024, "loss": loss.item(),
       "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if {device!r} == "cuda" else 0.0}}
"""
HEAD = "import json, resource, statistics, sys, time, torch\ntorch.set_num_threads({threads})\ntorch.manual_seed(0)\n"

OURS = HEAD + """sys.path.insert(0, {root!r})
import peft
from peft.lora import LoraConfig
from model import load_pretrained
from quant import int8
cfg = LoraConfig(r=8, alpha=16, targets="all-linear")
model = int8.load_lora8({path!r}, cfg, device={device!r}) if {method!r} == "lora8" else \
    peft.apply(load_pretrained({path!r}, device={device!r}), cfg)
model = model.to({device!r})
""" + LOOP + "print(json.dumps(res))\n"

HF = """
import resource, statistics, time
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model
torch.set_num_threads({threads})
q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
model = AutoModelForCausalLM.from_pretrained({path!r}, quantization_config=q, dtype=torch.float32,
                                             device_map={device!r})
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
""" + LOOP + "json.dump(res, open('res.json', 'w'))\n"


def weight_bytes(path):
    """Bytes of the int8 linears' weight + SCB as held in memory, vs 1 byte/param + 4 bytes per output row."""
    from model import load_pretrained
    from quant import int8
    dense = load_pretrained(path)
    lin = {n: m.weight.shape for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    del dense
    m = int8.load_int8(path)
    mods = dict(m.named_modules())
    measured = sum(t.numel() * t.element_size() for n in lin for t in (mods[n].weight, mods[n].SCB))
    n_params = sum(o * i for o, i in lin.values())
    predicted = n_params + 4 * sum(o for o, _ in lin.values())
    return len(lin), n_params, measured, predicted


def run(method, path):
    if method == "hf_bnb8":
        with tempfile.TemporaryDirectory() as d:
            code = HF.format(threads=THREADS, path=str(path), B=B, T=T, STEPS=STEPS, device=DEVICE)
            run_reference(code, d, timeout=1800)
            return json.load(open(os.path.join(d, "res.json")))
    code = OURS.format(root=ROOT, threads=THREADS, method=method, path=str(path), B=B, T=T, STEPS=STEPS,
                       device=DEVICE)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    global DEVICE, B, THREADS
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads (the same for every side)")
    ap.add_argument("--device", default="cpu", help="cuda: the same runs on the GPU (bench/gpu_check.sh)")
    ap.add_argument("--batch", type=int, default=B)
    a = ap.parse_args()
    DEVICE, B, THREADS = a.device, a.batch, a.threads
    from model.gguf import default_model
    path = default_model()
    load0 = os.getloadavg()[0]
    n_lin, n_params, measured, predicted = weight_bytes(path)
    print(f"SmolLM2-135M, the {n_lin} linears (lm_head tied to the embeddings, kept dense): {n_params:,} params; "
          f"int8 weight + SCB {measured / 1e6:.2f} MB measured, {predicted / 1e6:.2f} MB predicted = "
          f"{measured / n_params:.4f} bytes/param (fp32: 4, bf16: 2)\n")
    methods = ("lora", "lora8", "hf_bnb8")
    res = {m: [] for m in methods}
    for _ in range(a.rounds):  # alternating: every method once per round
        for m in methods:
            res[m].append(run(m, path))
    names = {"lora": "LoRA, fp32 base (ours)", "lora8": "LoRA on LLM.int8 base (ours, --method lora8)",
             "hf_bnb8": "HF + PEFT + bitsandbytes 8-bit (CPU)"}
    base = statistics.median(r["step_s"] for r in res["lora"])
    print(f"| SmolLM2-135M, LoRA r8 all-linear, B{B}xT{T}, fp32 compute, {DEVICE} ({THREADS} threads) | step s "
          "(median) | vs LoRA fp32 | peak RSS MB | RSS after load MB | peak GPU MB | loss at the last step |\n"
          "|---|---|---|---|---|---|---|")
    for m in methods:
        s = statistics.median(r["step_s"] for r in res[m])
        print(f"| {names[m]} | {s:.2f} | {s / base:.2f}x | {statistics.median(r['peak_rss_mb'] for r in res[m]):.0f} | "
              f"{statistics.median(r['load_rss_mb'] for r in res[m]):.0f} | "
              f"{statistics.median(r['peak_gpu_mb'] for r in res[m]):.0f} | {res[m][-1]['loss']:.4f} |")
    print(f"\n{a.rounds} rounds; step s per round: " + ", ".join(
        f"{m} {[round(r['step_s'], 2) for r in res[m]]}" for m in methods)
        + f"; 1-minute load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
