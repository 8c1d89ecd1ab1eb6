"""train.py's LoRA step vs HF transformers + PEFT: tokens/s, peak RSS and model FLOP utilisation (MFU).

    python bench/bench_train.py [--steps 3] [--warmup 1] [--rounds 2] [--precisions fp32,bf16] [--model DIR]
                                [--workloads packed,sft,docs] [--batch 8] [--seq 128]
    python bench/bench_train.py --scaling 512,1024,2048,4096 [--tokens 4096] [--workloads packed]
    python -P bench/bench_train.py --worker ours --profile --model DIR --workload sft --precision fp32  (from /tmp)
        (--profile also prints, to stderr, the rank-R LoRA products' share of self time and the MFU of the timed
        steps against a matmul peak measured in the same process; BENCH_THREADS sets the threads, default 2)

--scaling: one table row pair per sequence length T, with B = --tokens / T (the same tokens per step), for the
seq-len scaling of peak RSS and tokens/s.

SmolLM2-135M-Instruct, CPU, LoRA r8 alpha16 on all linear layers, B8 x T128, the same token batches for both:
  packed text:        every position is a target (continued pre-training rows)
  prompt-masked SFT:  the first half of each row is label -100 (the prompt)
  docs:               --pack rows: documents of seeded random lengths (T/8 .. T/2) back to back, attention inside
                      each; nanotune as train.py runs it (batch["segments"], no mask), "nanotune dense" with the
                      (B, 1, T, T) block-diagonal mask instead (the path before), HF with that mask + position_ids
Each (implementation, workload, precision) runs in its own process (clean peak RSS; HF's `peft` is imported
outside the repo, where ours does not shadow it). Step time is the median over --steps after --warmup steps,
pooled over --rounds processes per side run in alternating order; peak RSS is the largest of a side's rounds.
MFU = model FLOPs per step / step time / matmul peak. Model FLOPs of a LoRA step = forward + input-gradient
backward = 2 x forward (frozen weights get no weight gradient; Kaplan et al. 2020), forward = 2 * body params *
B*T + 2 * vocab * hidden * (trained positions) + causal attention 2 * B * T^2 * heads * head_dim; the useful
work, the same for both implementations (HF also computes logits at untrained positions: its loss, not work).
The matmul peak is the best of 2048^3 and the step's largest GEMM shape, measured in the same run.
bf16: HF runs torch's bf16 autocast kernels; nanotune rounds operands to bf16 the same way but, on a CPU without
bf16 matrix hardware (AMX / AVX512-BF16; model/ops.py native_half_gemm), multiplies them in fp32 (gemm_dtype),
because torch's bf16 GEMMs there are emulated and much slower (README: Benchmarks). The bf16 MFU peak is then the
fp32 one (what the GEMMs run on).
An HF bf16 step takes minutes on such a CPU: use e.g. `--precisions bf16 --workloads sft --steps 1`.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

B, T, R, ALPHA = 8, 128, 8, 16
REPO = Path(__file__).resolve().parent.parent


def doc_lengths() -> list[list[int]]:
    import random
    rng, rows = random.Random(0), []
    for _ in range(B):
        row = []
        while sum(row) < T:
            row.append(min(rng.randint(T // 8, T // 2), T - sum(row)))
        rows.append(row)
    return rows


def batch(workload: str, vocab: int):
    """ids, labels, and for docs the segments, position_ids and (B, 1, T, T) bool block-diagonal mask."""
    import torch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    if workload == "sft":
        labels[:, :T // 2] = -100
    if workload != "docs":
        return ids, labels, None, None, None
    lens = doc_lengths()
    seg = torch.tensor([[i for i, n in enumerate(r) for _ in range(n)] for r in lens])
    pos = torch.tensor([[j for n in r for j in range(n)] for r in lens])
    labels[pos == 0] = -100  # a document's first token: nothing in it predicts it
    mask = ((seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[:, None]
    return ids, labels, lens, pos, mask


def worker_ours(model_dir, workload, precision, steps, warmup, dense=False, profile=False):
    import torch
    sys.path.insert(0, str(REPO))
    import train
    cfg = train.TrainConfig(model=model_dir, data="-", method="lora", precision=precision, lr=1e-4, max_grad_norm=1.0,
                            method_args={"lora_r": R, "lora_alpha": ALPHA, "lora_targets": "all-linear"})
    device = torch.device("cpu")
    model = train.build_model(cfg, device)
    model.train()
    opt = train.make_optimizer(model, cfg)
    sched = train.make_scheduler(opt.optimizer, cfg, 1000)
    ids, labels, lens, pos, mask = batch(workload, model.cfg.vocab_size)
    mb = [{"input_ids": ids, "train_mask": labels != -100, "labels": labels, "attention_mask": mask,
           "position_ids": pos}]
    if lens is not None and not dense:
        mb[0]["segments"] = lens
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        train.train_step(model, mb, opt, sched, cfg, device)
        times.append(time.perf_counter() - t)
    if profile:  # one more step under torch.profiler: where the time goes, by op (self time)
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            train.train_step(model, mb, opt, sched, cfg, device)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
        profile_summary(p, model.cfg, workload, statistics.median(times[warmup:]))
    return times[warmup:]


def profile_summary(p, mcfg, workload, step_s):
    """The products split into rank-R (LoRA) and the rest by their operand shapes, and the timed steps' MFU
    against a matmul peak measured now, in the same process (printed to stderr: stdout's last line is the JSON)."""
    total = sum(e.self_cpu_time_total for e in p.key_averages())
    lora = other = 0.0
    for e in p.key_averages(group_by_input_shape=True):
        if e.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"):
            dims = [d for shape in e.input_shapes if isinstance(shape, list) for d in shape]
            if R in dims:
                lora += e.self_cpu_time_total
            else:
                other += e.self_cpu_time_total
    peak = matmul_peak("float32")
    print(f"self time {total / 1e6:.2f} s: rank-{R} (LoRA) products {lora / total:.1%}, other products "
          f"{other / total:.1%}; timed step {step_s:.2f} s, matmul peak {peak:.0f} GFLOP/s now, "
          f"MFU {step_flops(mcfg, workload) / step_s / peak / 1e9:.0%}", file=sys.stderr, flush=True)


def worker_hf(model_dir, workload, precision, steps, warmup):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids, labels, _, pos, mask = batch(workload, model.config.vocab_size)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=labels, attention_mask=mask, position_ids=pos).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times[warmup:]


def matmul_peak(dtype_name: str, shapes=((2048, 2048, 2048), (1024, 576, 1536)), reps: int = 5) -> float:
    """Best GFLOP/s over a few GEMM shapes (m, k, n), best of 5 timings of `reps` products each."""
    import torch
    dtype = getattr(torch, dtype_name)
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(2):
            a @ b
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9)
    return best


def step_flops(cfg, workload: str) -> float:
    """Useful FLOPs of one LoRA step on B x T tokens (see the module docstring)."""
    d, hd, nh = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
    body = cfg.num_hidden_layers * (d * hd * (nh + 2 * cfg.num_key_value_heads) + nh * hd * d
                                    + 3 * d * cfg.intermediate_size)
    trained = B * (T - 1) if workload == "packed" else B * (T - T // 2)  # labels[:, 1:] not -100
    pairs = B * T * T                                                         # query-key pairs x 2 (causal half)
    if workload == "docs":
        lens = doc_lengths()
        trained, pairs = B * T - sum(map(len, lens)), sum(n * n for r in lens for n in r)
    attn = cfg.num_hidden_layers * 2 * pairs * nh * hd                        # QK^T and PV, causal half
    return 2 * (2 * body * B * T + 2 * cfg.vocab_size * d * trained + attn)


def run_worker(impl, model_dir, workload, precision, steps, warmup) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = ["--worker", impl, "--model", model_dir, "--workload", workload, "--precision", precision,
            "--steps", str(steps), "--warmup", str(warmup), "--batch", str(B), "--seq", str(T)]
    with tempfile.TemporaryDirectory() as cwd:  # outside the repo: HF's peft, not ours
        r = subprocess.run([sys.executable, "-P", str(Path(__file__).resolve()), *args], cwd=cwd, env=env,
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{impl} {workload} {precision} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    global B, T  # --batch / --seq: the workers' shapes too
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per side, in alternating order")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--workloads", default="packed,sft")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--workload", default=None)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--batch", type=int, default=B)
    ap.add_argument("--seq", type=int, default=T)
    ap.add_argument("--scaling", default=None, help="comma-separated sequence lengths, B = --tokens / T")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--profile", action="store_true", help="--worker ours: print torch.profiler's top ops of a step")
    a = ap.parse_args()
    B, T = a.batch, a.seq
    if a.worker:
        import torch
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
        if a.worker == "hf":
            times = worker_hf(a.model, a.workload, a.precision, a.steps, a.warmup)
        else:
            times = worker_ours(a.model, a.workload, a.precision, a.steps, a.warmup, dense=a.worker == "ours-dense",
                                profile=a.profile)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        print(json.dumps({"step_s": statistics.median(times), "times": times, "peak_rss_gb": rss}))
        return
    sys.path.insert(0, str(REPO))
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    if a.model is None:
        from model.gguf import default_model
        a.model = str(default_model())
    import model as M
    from model.ops import native_half_gemm
    mcfg = M.load_pretrained(a.model).cfg
    native_bf16 = native_half_gemm("cpu")
    peaks = {"fp32": matmul_peak("float32")}
    peaks["bf16"] = matmul_peak("bfloat16") if native_bf16 else peaks["fp32"]
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    print(f"machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; matmul peak fp32 "
          f"{peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s"
          + ("" if native_bf16 else " (no AMX/AVX512-BF16: the fp32 peak)"), flush=True)
    shapes = [(a.tokens // t, t) for t in map(int, a.scaling.split(","))] if a.scaling else [(B, T)]
    print(f"model {a.model}, LoRA r{R} a{ALPHA} all-linear, B x T {', '.join(f'{b}x{t}' for b, t in shapes)}, "
          f"median of {a.rounds} x {a.steps} steps after {a.warmup} warmup each\n")
    print("| workload | B x T | precision | impl | tokens/s | speed-up | peak RSS GB | RSS ratio | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (B, T), workload in ((shape, w) for shape in shapes for w in a.workloads.split(",")):
        for precision in a.precisions.split(","):
            # rounds in alternating order (hf, ours, ours, hf, ...): a slow spell of a shared machine then hits
            # both sides; the step time is the median over every timed step of every round
            impls = ("hf", "ours", "ours-dense") if workload == "docs" else ("hf", "ours")
            runs = {impl: [] for impl in impls}
            for rnd in range(a.rounds):
                for impl in impls if rnd % 2 == 0 else impls[::-1]:
                    runs[impl].append(run_worker(impl, a.model, workload, precision, a.steps, a.warmup))
            res = {impl: {"step_s": statistics.median(t for r in rs for t in r["times"]),
                          "peak_rss_gb": max(r["peak_rss_gb"] for r in rs)} for impl, rs in runs.items()}
            for impl in impls:
                r = res[impl]
                tps = B * T / r["step_s"]
                mfu = step_flops(mcfg, workload) / r["step_s"] / (peaks[precision] * 1e9)
                speed = tps / (B * T / res["hf"]["step_s"])
                ratio = r["peak_rss_gb"] / res["hf"]["peak_rss_gb"]
                name = {"hf": "HF+PEFT", "ours": "nanotune", "ours-dense": "nanotune dense mask"}[impl]
                print(f"| {workload} | {B}x{T} | {precision} | {name} | {tps:.0f} | {speed:.2f}x | {r['peak_rss_gb']:.2f} | "
                      f"{ratio:.2f} | {100 * mfu:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
