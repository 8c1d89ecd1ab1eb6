"""One full fine-tuning step and one LoRA step per architecture (Gemma 2, Gemma 3, Phi-3, Mixtral, Qwen2-MoE,
Qwen3-MoE) at a ~100M-parameter random config, ours vs transformers (+ HF PEFT), and the MoE dispatch alone.

Each (architecture, method, side) runs in its own fresh process (peak RSS is per process), `python -P` outside the
repo so that HF's peft is the one imported on the transformers side. fp32, AdamW, median step time after a warm-up
step, over --arch-rounds fresh processes per side in alternating order (this VM's speed drifts by tens of %
between minutes). LoRA: r=8 on the attention projections (q_proj, v_proj; Phi-3's fused qkv_proj), the same on
both sides.
The dispatch bench times one MoE block forward + backward (all its weights trained, or the experts frozen as
under LoRA on attention), in alternating rounds: our sorted dispatch (grouped_mm; and its per-expert loop, which a
wrapped expert takes) vs transformers' expert loop (`experts_implementation="eager"`) and its default
(`grouped_mm`).

    python bench/bench_archs.py [--steps 3] [--batch 4] [--seq 256] [--threads 2] [--archs gemma2,mixtral]
                                [--arch-rounds 2] [--dispatch-tokens 4096] [--rounds 7] [--dispatch-only]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
            num_key_value_heads=4, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=512)
ARCHS = {
    "gemma2": dict(model_type="gemma2", head_dim=64, query_pre_attn_scalar=64, sliding_window=128),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=64, query_pre_attn_scalar=64, sliding_window=128),
    "phi3": dict(model_type="phi3"),
    "mixtral": dict(model_type="mixtral", num_local_experts=8, intermediate_size=512, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=8, shared_expert_intermediate_size=1024, **MOE),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=8, head_dim=64, **MOE),
}

MAKE = r"""
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
cfg = json.loads(sys.argv[1])
m = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
m.save_pretrained(sys.argv[2])
print(sum(p.numel() for p in m.parameters()))
"""

WORKER = r"""
import json, resource, statistics, sys, time, torch
side, model_dir, method, steps, B, T, threads = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:8])
targets = json.loads(sys.argv[8])
torch.set_num_threads(threads)
torch.manual_seed(0)
if side == "ours":
    sys.path.insert(0, sys.argv[9])
    import peft
    from model import load_pretrained
    model = load_pretrained(model_dir).train()
    if method == "lora":
        model = peft.apply(model, peft.LoraConfig(r=8, alpha=16, targets=targets))
    def loss_fn(ids):  # the same loss as HF's labels=ids
        logits = model(ids)
        labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
ids = torch.randint(3, 32000, (B, T))
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

DISPATCH = r"""
import json, statistics, sys, time, torch
from transformers import AutoConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
sys.path.append(sys.argv[1])  # after transformers: our model package only (no peft here)
from model import ModelConfig
from model.moe import SparseMoE
torch.set_num_threads(int(sys.argv[2]))
N, reps = int(sys.argv[3]), int(sys.argv[5])
cfg = json.loads(sys.argv[4])
torch.manual_seed(0)
x = torch.randn(1, N, cfg["hidden_size"])
ours = SparseMoE(ModelConfig.from_hf(cfg), torch.nn.functional.silu)
loop = SparseMoE(ModelConfig.from_hf(cfg), torch.nn.functional.silu)
loop.load_state_dict(ours.state_dict())
loop.experts[0].w1 = torch.nn.Sequential(loop.experts[0].w1)  # a wrapped expert: the per-expert loop
blocks = {"nanotune (grouped_mm)": ours, "nanotune (per-expert loop)": loop}
for impl in ("eager", "grouped_mm"):
    c = AutoConfig.for_model(**cfg)
    c._experts_implementation = impl
    hf = MixtralSparseMoeBlock(c)
    with torch.no_grad():  # the same weights, fused as transformers 5 keeps them
        hf.gate.weight.copy_(ours.gate.weight)
        hf.experts.gate_up_proj.copy_(torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in ours.experts]))
        hf.experts.down_proj.copy_(torch.stack([e.w2.weight for e in ours.experts]))
    blocks[f"transformers ({impl})"] = hf
with torch.no_grad():
    assert all((b(x)[0] if isinstance(b(x), tuple) else b(x)).sub(ours(x)).abs().max() < 1e-4 for b in blocks.values())
res = {}
for mode in ("full", "frozen"):  # frozen: the experts' weights need no gradient (LoRA on attention)
    for b in blocks.values():
        for n, p in b.named_parameters():
            p.requires_grad_(mode == "full" or "gate." in n)
    times = {k: [] for k in blocks}
    for r in range(reps + 1):  # alternating rounds; the first is a warm-up
        for k, b in blocks.items():
            xi = x.clone().requires_grad_()
            t0 = time.perf_counter()
            y = b(xi)
            (y[0] if isinstance(y, tuple) else y).square().mean().backward()
            times[k].append(time.perf_counter() - t0)
    res[mode] = {k: N / statistics.median(t[1:]) for k, t in times.items()}
print(json.dumps(res))
"""


def python_P(code, *args):
    with tempfile.TemporaryDirectory() as cwd:
        script = os.path.join(cwd, "worker.py")
        with open(script, "w") as f:
            f.write(code)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
        r = subprocess.run([sys.executable, "-P", script, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                           text=True)
    if r.returncode:
        sys.exit(f"worker failed:\n{r.stderr[-3000:]}")
    return r.stdout.strip().splitlines()[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--dispatch-tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=7, help="dispatch bench: timed rounds")
    ap.add_argument("--arch-rounds", type=int, default=2, help="fresh processes per side, in alternating order")
    ap.add_argument("--dispatch-only", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in [] if args.dispatch_only else args.archs.split(","):
            d = os.path.join(tmp, arch)
            n = int(python_P(MAKE, json.dumps({**BASE, **ARCHS[arch]}), d))
            targets = ["qkv_proj"] if arch == "phi3" else ["q_proj", "v_proj"]
            runs = {(side, m): [] for side in ("ours", "hf") for m in ("full", "lora")}
            for k in range(args.arch_rounds):  # fresh processes, the two sides in alternating order
                for m in ("full", "lora"):
                    for side in ("ours", "hf")[::1 if k % 2 == 0 else -1]:
                        runs[side, m].append(json.loads(python_P(WORKER, side, d, m, args.steps, args.batch,
                                                                 args.seq, args.threads, json.dumps(targets), REPO)))
            r = {side: {m: {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs[side, m]),
                            "peak_rss_gb": max(x["peak_rss_gb"] for x in runs[side, m])} for m in ("full", "lora")}
                 for side in ("ours", "hf")}
            rows.append((arch, n, r))
            print(arch, json.dumps(r), file=sys.stderr)
    print(f"fp32, B{args.batch}xT{args.seq}, {args.threads} threads, median over {args.arch_rounds} alternating "
          f"rounds of each process's median of {args.steps - 1} steps after a warm-up; peak RSS: the largest; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| arch (params) | method | nanotune tok/s | transformers tok/s | ratio | nanotune RSS GB | "
          "transformers RSS GB |\n|---|---|---|---|---|---|---|")
    for arch, n, r in rows:
        for m in ("full", "lora"):
            o, h = r["ours"][m], r["hf"][m]
            print(f"| {arch} ({n / 1e6:.0f}M) | {m} | {o['tokens_per_s']:.0f} | {h['tokens_per_s']:.0f} | "
                  f"{o['tokens_per_s'] / h['tokens_per_s']:.2f}x | {o['peak_rss_gb']:.2f} | {h['peak_rss_gb']:.2f} |")
    moe = {**BASE, **ARCHS["mixtral"], "num_hidden_layers": 1}
    res = json.loads(python_P(DISPATCH, REPO, args.threads, args.dispatch_tokens, json.dumps(moe), args.rounds))
    print(f"\nMoE block forward + backward, {args.dispatch_tokens} tokens, 8 experts top-2, hidden 768, expert width "
          f"512, median of {args.rounds} alternating rounds:\n\n| dispatch | experts | tokens/s | "
          f"nanotune (grouped_mm) vs it |\n|---|---|---|---|")
    for mode, r in res.items():
        for k, v in r.items():
            print(f"| {k} | {mode} | {v:.0f} | {r['nanotune (grouped_mm)'] / v:.2f}x |")

if __name__ == "__main__":
    main()
