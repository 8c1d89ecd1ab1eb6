"""One PEFT training step (forward + backward + AdamW, fp32) on SmolLM2-135M for each of our methods, and for
HF transformers + PEFT where PEFT has the method.

Each configuration runs in its own fresh process (peak RSS is per process, via resource.getrusage); HF runs as
`python -P` outside the repo, since our peft/ package would shadow HF's. Batch: random tokens, the first half of
each row label-masked (-100), the prompt-masked SFT batch of bench_train.py. Prints a markdown table.

    python bench/bench_peft.py [--steps 4] [--batch 8] [--seq 128] [--threads 2] [--only lora,ia3]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# method -> (our config expression, HF PEFT config expression or None when PEFT has no such method)
METHODS = {  # cheap ones first: rows print as they finish, so a cut-short run still leaves a table
    "LoRA r8 all-linear": ("peft.LoraConfig(r=8, alpha=16, targets='all-linear')",
                           "peft.LoraConfig(r=8, lora_alpha=16, target_modules='all-linear', task_type='CAUSAL_LM')"),
    "IA3 (k, v, down)": ("peft.IA3Config()", "peft.IA3Config(task_type='CAUSAL_LM')"),
    "BitFit all-linear": ("peft.BitFitConfig(targets='all-linear')", None),
    "Pfeiffer r16": ("peft.AdapterConfig(kind='pfeiffer')", None),
    "Houlsby r16": ("peft.AdapterConfig(kind='houlsby')", None),
    "DoRA r8 all-linear": ("peft.LoraConfig(r=8, alpha=16, targets='all-linear', dora=True)",
                           "peft.LoraConfig(r=8, lora_alpha=16, target_modules='all-linear', use_dora=True, "
                           "task_type='CAUSAL_LM')"),
}

WORKER = r"""
import json, resource, statistics, sys, time, torch
side, model_dir, cfg_expr, steps, B, T, threads = sys.argv[1:8]
steps, B, T, threads = int(steps), int(B), int(T), int(threads)
torch.set_num_threads(threads)
torch.manual_seed(0)
ids = torch.randint(0, 49152, (B, T))
labels = ids.clone()
labels[:, : T // 2] = -100
if side == "ours":
    sys.path.insert(0, sys.argv[8])
    import peft
    from model import load_pretrained
    model = peft.apply(load_pretrained(model_dir), eval(cfg_expr)).train()
    def loss_fn():
        logits = model(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
else:
    import peft
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(model, eval(cfg_expr)).train()
    def loss_fn():
        return model(input_ids=ids, labels=labels).loss
params = [p for p in model.parameters() if p.requires_grad]
total = sum(p.numel() for p in model.parameters())
opt = torch.optim.AdamW(params, lr=1e-4)
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    loss = loss_fn()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
times = times[1:]  # the first step allocates the optimizer state
print(json.dumps({"step_s": statistics.median(times), "trainable": sum(p.numel() for p in params),
                  "total": total, "loss": float(loss),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run(side, model_dir, cfg_expr, args):
    with tempfile.TemporaryDirectory() as cwd:
        script = os.path.join(cwd, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        r = subprocess.run([sys.executable, "-P", script, side, str(model_dir), cfg_expr, str(args.steps),
                            str(args.batch), str(args.seq), str(args.threads), REPO],
                           cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{side} worker ({cfg_expr}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="HF model dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--only", default=None, help="comma-separated substrings of method names to run")
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    from model.gguf import default_model
    model_dir = args.model or default_model()
    tokens = args.batch * args.seq
    load0 = os.getloadavg()[0]
    print(f"PEFT training step, {os.path.basename(str(model_dir))} fp32, B{args.batch}xT{args.seq} (first half of "
          f"each row label-masked), {args.threads} threads, median of {args.steps - 1} steps after one warm-up; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| method | implementation | trainable params | trainable % | step (s) | tokens/s | peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for name, (ours, hf) in METHODS.items():
        if args.only and not any(s.lower() in name.lower() for s in args.only.split(",")):
            continue
        for side, expr in (("nanotune", ours), ("HF PEFT", hf)):
            if expr is None:
                continue
            r = run("ours" if side == "nanotune" else "hf", model_dir, expr, args)
            print(f"| {name} | {side} | {r['trainable']:,d} | {100 * r['trainable'] / r['total']:.3f} | "
                  f"{r['step_s']:.2f} | {tokens / r['step_s']:.0f} | {r['peak_rss_gb']:.2f} |", flush=True)
    load1 = os.getloadavg()[0]
    busy = max(load0, load1) > os.cpu_count()
    print(f"\n1-minute load average: {load0:.1f} at start, {load1:.1f} at end"
          + (f" (above {os.cpu_count()}: other jobs shared the CPU, step times are inflated)" if busy else ""))


if __name__ == "__main__":
    main()
