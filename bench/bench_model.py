"""One full fine-tuning step (forward + backward + AdamW, fp32) on SmolLM2-135M, ours vs transformers.

Each side runs in its own fresh process (peak RSS is per process); transformers runs as `python -P` outside the
repo, since our peft/ package would shadow HF's. Prints a markdown table: median tokens/s and peak RSS.

    python bench/bench_model.py [--steps 6] [--batch 8] [--seq 128] [--threads 2]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, resource, statistics, sys, time, torch
side, model_dir, steps, B, T, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
torch.manual_seed(0)
if side == "ours":
    sys.path.insert(0, sys.argv[7])
    from model import load_pretrained
    model = load_pretrained(model_dir).train()
    def loss_fn(ids):  # the same loss as HF's labels=ids: shift the labels (not the logits), pad with -100
        logits = model(ids)
        labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
ids = torch.randint(0, 49152, (B, T))
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    loss = loss_fn(ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
times = times[1:]  # the first step allocates the optimizer state
print(json.dumps({"tokens_per_s": B * T / statistics.median(times), "loss": float(loss),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run(side, model_dir, args):
    with tempfile.TemporaryDirectory() as cwd:
        script = os.path.join(cwd, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        r = subprocess.run([sys.executable, "-P", script, side, str(model_dir), str(args.steps), str(args.batch),
                            str(args.seq), str(args.threads), REPO], cwd=cwd, env=env, capture_output=True,
                           text=True)
    if r.returncode:
        sys.exit(f"{side} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    from model.gguf import default_model
    model_dir = default_model()
    ours, hf = run("ours", model_dir, args), run("hf", model_dir, args)
    print(f"Full fine-tune step, SmolLM2-135M fp32, B{args.batch}xT{args.seq}, {args.threads} threads, "
          f"median of {args.steps - 1} steps; {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| | tokens/s | peak RSS (GB) |\n|---|---|---|")
    print(f"| nanotune | {ours['tokens_per_s']:.0f} | {ours['peak_rss_gb']:.2f} |")
    print(f"| transformers | {hf['tokens_per_s']:.0f} | {hf['peak_rss_gb']:.2f} |")
    print(f"| ratio | {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x | "
          f"{ours['peak_rss_gb'] / hf['peak_rss_gb']:.2f}x |")


if __name__ == "__main__":
    main()
