"""CPU bench: per-rank memory of --zero 3 (every weight sharded, the base loaded sharded: dist/sharded_load.py)
vs --zero 2 (weights replicated, the whole model loaded on every rank), world sizes 1, 2, 4, through train.py
under torchrun on a random-init llama (char tokenizer, vocab 128), fp32, 1 thread per rank.

    python bench/bench_zero3_frozen.py [--layers 16 --hidden 1536 --methods lora full --worlds 1 2 4 --steps 1]
                                       [--model DIR: a model written by an earlier run (its path is printed)]
Reads each run's --out/memory.json (dist/ledger.py, after step 1): measured frozen / trainable-state tensor
bytes per rank, the process's RSS then, and its peak RSS (ru_maxrss: the load and step 1 included). Prints a
markdown table with each peak relative to the same method and stage on 1 rank. The environment is passed on:
`MALLOC_MMAP_THRESHOLD_=1048576 python bench/...` makes glibc return freed blocks (stage 3 frees a block per step).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.tiny import chat_records, make_model, write_jsonl  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--methods", nargs="+", default=["lora"])
    ap.add_argument("--zeros", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--model", type=Path, help="reuse this random model dir (--layers/--hidden then ignored)")
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="bench_z3_"))
    m = a.model or make_model(d / "m", hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3,
                              num_hidden_layers=a.layers, num_attention_heads=12, num_key_value_heads=4,
                              tie_word_embeddings=False)
    if a.model:
        cfg = json.loads((m / "config.json").read_text())
        a.layers, a.hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    data = write_jsonl(d / "train.jsonl", chat_records(32, seed=2))
    size = (m / "model.safetensors").stat().st_size
    print(f"model {m}\nrandom llama: {a.layers} layers, hidden {a.hidden}: {size / 1e6:.0f} MB of fp32 weights "
          f"({size / 4e6:.0f}M "
          f"params); LoRA r=16 all-linear, batch 1 x 128 tokens per rank, {a.steps} step(s); load {os.getloadavg()}\n")
    print("| method | zero | world | frozen MB/rank | trainable state MB/rank | RSS after step 1 MB/rank | "
          "peak RSS MB/rank | peak / 1-rank peak | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in a.methods:
        for zero in a.zeros:
            one = None
            for world in a.worlds:
                out = d / f"{method}z{zero}w{world}"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                       "--master_port", str(29600 + 10 * zero + world), str(REPO / "train.py"), "--model", str(m),
                       "--data", str(data), "--out", str(out), "--method", method, "--lora-r", "16", "--zero",
                       str(zero), "--batch-size", "1", "--seq-len", "128", "--max-steps", str(a.steps),
                       "--precision", "fp32", "--quiet"]
                t0 = time.time()
                subprocess.run(cmd, check=True, capture_output=True, cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
                recs = json.loads((out / "memory.json").read_text())
                peak = max(r["peak"] for r in recs)
                one = one or peak
                mb = lambda key: "/".join(f"{v / 1e6:.0f}" for v in key)  # noqa: E731
                print(f"| {method} | {zero} | {world} | {mb(r['measured']['frozen'] for r in recs)} | "
                      f"{mb(sum(v for k, v in r['measured'].items() if k != 'frozen') for r in recs)} | "
                      f"{mb(r['rss'] for r in recs)} | {mb(r['peak'] for r in recs)} | {peak / one:.2f}x | "
                      f"{time.time() - t0:.0f} |", flush=True)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
