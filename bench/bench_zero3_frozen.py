"""CPU bench: per-rank memory of LoRA with --zero 3 (frozen base sharded) vs --zero 2 (base replicated), on 1
and 2 gloo ranks, through train.py under torchrun on a random-init llama (char tokenizer, vocab 128).

    python bench/bench_zero3_frozen.py [--layers 8 --hidden 768 --worlds 1 2 --steps 2]
Reads each run's --out/memory.json (dist/ledger.py, after step 1): measured frozen / trainable-state tensor
bytes per rank, the process's RSS then, and its peak RSS (which includes loading the whole model on every rank
before sharding: there is no sharded loading yet). Prints a markdown table.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.tiny import chat_records, make_model, write_jsonl  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="bench_z3_"))
    m = make_model(d / "m", hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3, num_hidden_layers=a.layers,
                   num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
    data = write_jsonl(d / "train.jsonl", chat_records(32, seed=2))
    size = (m / "model.safetensors").stat().st_size
    print(f"random llama: {a.layers} layers, hidden {a.hidden}: {size / 1e6:.0f} MB of fp32 weights; LoRA r=16 "
          f"all-linear, batch 1 x 128 tokens per rank, {a.steps} steps\n")
    print("| zero | world | frozen MB/rank | trainable state MB/rank | RSS after step 1 MB/rank | peak RSS MB/rank |")
    print("|---|---|---|---|---|---|")
    for zero in (2, 3):
        for world in a.worlds:
            out = d / f"z{zero}w{world}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
                   str(29600 + 10 * zero + world), str(REPO / "train.py"), "--model", str(m), "--data", str(data),
                   "--out", str(out), "--method", "lora", "--lora-r", "16", "--zero", str(zero), "--batch-size", "1",
                   "--seq-len", "128", "--max-steps", str(a.steps), "--precision", "fp32", "--quiet"]
            subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
            recs = json.loads((out / "memory.json").read_text())
            mb = lambda key: "/".join(f"{v / 1e6:.0f}" for v in key)  # noqa: E731
            print(f"| {zero} | {world} | {mb(r['measured']['frozen'] for r in recs)} | "
                  f"{mb(sum(v for k, v in r['measured'].items() if k != 'frozen') for r in recs)} | "
                  f"{mb(r['rss'] for r in recs)} | {mb(r['peak'] for r in recs)} |", flush=True)


if __name__ == "__main__":
    main()
