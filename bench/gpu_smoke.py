"""gpu_check.sh's smoke of the GPU paths on a tiny model: the SDPA backend our attention shapes get, the packed
varlen path vs the exact per-example loop, and train.py (full, lora, qlora, --pack, --zero 2 --offload) and
generate.py on the device, each run under torch.cuda.set_sync_debug_mode("warn") with the host syncs counted.

    python bench/gpu_smoke.py            # on a GPU: markdown tables
    python bench/gpu_smoke.py --cpu      # the same runs on the CPU (a dry run of this script; no sync counts)
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from model import ops  # noqa: E402

# run a script with every synchronizing CUDA call warned about, each warning printed (not deduplicated)
SYNC_WRAP = """import runpy, sys, warnings, torch
warnings.simplefilter("always")
if torch.cuda.is_available():
    torch.cuda.set_sync_debug_mode("warn")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
RUNS = {"full": ["--method", "full"], "lora": ["--method", "lora"], "qlora": ["--method", "qlora"],
        "lora --pack": ["--method", "lora", "--pack"], "full --zero 2 --offload": ["--method", "full", "--zero", "2",
                                                                                 "--offload"]}


def sdpa_backends(dev):
    """Which fused SDPA kernel torch picks for our shapes (SmolLM2's heads: 9 query, 3 KV, head_dim 64)."""
    from torch.nn.attention import SDPBackend
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q = torch.randn(4, 9, 512, 64, device=dev, dtype=dt)
    k = torch.randn(4, 3, 512, 64, device=dev, dtype=dt)
    ke = k.repeat_interleave(3, 1)
    mask = torch.ones(4, 1, 512, 512, dtype=torch.bool, device=dev).tril()
    cases = {"causal, GQA (training, right padding)": (q, k, dict(is_causal=True, enable_gqa=True)),
             "bool mask, GQA": (q, k, dict(attn_mask=mask, enable_gqa=True)),
             "bool mask, KV expanded (left-padded generation)": (q, ke, dict(attn_mask=mask))}
    print(f"\n| SDPA case ({dev}, {dt}) | backend |\n|---|---|")
    for name, (qq, kk, kw) in cases.items():
        print(f"| {name} | {SDPBackend(torch._fused_sdp_choice(qq, kk, kk, **kw)).name} |")


def packed_vs_loop(dev):
    """The packed path (varlen on CUDA bf16) against the per-example loop in fp32: max-abs difference."""
    g = torch.Generator().manual_seed(0)
    lens = [[100, 300, 112], [512], [7, 5, 400, 100]]
    segs = ops.Segments(lens)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q, k, v = (torch.randn(3, h, 512, 64, generator=g).to(dev, dt) for h in (9, 3, 3))
    fast = ops.attention(q, k, v, segs)
    pairs, ops.LOOP_PAIRS_PER_CALL = ops.LOOP_PAIRS_PER_CALL, 0  # the reference: the loop, whatever the CPU's choice
    ref = ops._packed(q.float().cpu(), k.float().cpu(), v.float().cpu(), segs, None)
    ops.LOOP_PAIRS_PER_CALL = pairs
    dense = ops.attention(q, k, v, segs.dense(dev))
    err = (fast.float().cpu() - ref).abs().max().item()
    err_dense = (dense.float().cpu() - ref).abs().max().item()
    print(f"\n| packed attention ({dev}, {dt}) | max-abs vs fp32 per-example loop |\n|---|---|\n"
          f"| Segments (varlen on CUDA) | {err:.2e} |\n| dense block-diagonal mask | {err_dense:.2e} |")
    return err <= 2 * err_dense + 1e-6


def smoke(dev):
    """train.py and generate.py on a tiny llama: exit code, seconds, synchronizing calls warned about."""
    from tests.tiny import make_model
    ok = True
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model = make_model(d / "tiny")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
        if dev == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        print("\n| run (tiny llama, 6 steps, logged once) | exit | s | sync warnings |\n|---|---|---|---|")
        for name, flags in {**RUNS, "full --zero 2, NANOTUNE_PG=1 (a one-rank NCCL group)": ["--method", "full",
                                                                                              "--zero", "2"]}.items():
            cmd = [sys.executable, "-c", SYNC_WRAP, "train.py", "--model", str(model), "--data",
                   "data/default/train.jsonl", "--out", str(d / name.replace(" ", "_")), "--max-steps", "6",
                   "--log-every", "6", "--batch-size", "4", "--seq-len", "128", "--quiet", *flags]
            ok &= run(name, cmd, {**env, "NANOTUNE_PG": "1"} if "PG" in name else env)
        adapter = d / "lora" / "adapter"
        cmd = [sys.executable, "-c", SYNC_WRAP, "generate.py", "--model", str(model), "--adapter", str(adapter),
               "--prompt", "Hello", "--max-new-tokens", "16", "--greedy"]
        ok &= run("generate.py (16 tokens)", cmd, env)
    return ok


def run(name, cmd, env) -> bool:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    syncs = r.stderr.count("called a synchronizing CUDA operation")
    print(f"| {name} | {r.returncode} | {time.perf_counter() - t:.1f} | {syncs} |", flush=True)
    if r.returncode:
        print("```\n" + r.stderr[-1500:] + "\n```")
    return r.returncode == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU")
    a = ap.parse_args()
    dev = "cpu" if a.cpu else "cuda"
    if dev == "cuda":
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
    sdpa_backends(dev)
    ok = packed_vs_loop(dev)
    ok &= smoke(dev)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
