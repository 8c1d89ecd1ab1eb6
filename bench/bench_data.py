"""The data path (read + validate + render through the chat template + tokenise + mask) of two versions of the code.

    python bench/bench_data.py [--records 20000] [--rounds 3] [--base 791baaf] [--model DIR]

Writes a synthetic, deterministic sharegpt JSONL file (multi-turn, some with a system turn), extracts the code of
commit --base with `git archive` into a temporary directory, then times `python -m data.inspect --model M --data F
-n 0` in fresh processes for the base and for the working tree, alternating (base, new, new, base, ...), and prints
the median wall time of each side and the ratio. (--new: another tree, e.g. a `git archive` snapshot). Before timing, both sides' examples (ids and trained-token masks)
are compared: the speed-up must not change a single token. The tokenizer is the real SmolLM2 one (byte-level BPE,
its own ChatML template with a default system prompt) unless --model names another.
"""
import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the model learns to answer short questions about cats dogs rivers mountains numbers code tea "
         "music history and the weather in a calm helpful voice with clear steps and one example").split()


def make_records(n: int, seed: int = 0) -> list[dict]:
    """n sharegpt records: 1-4 user/assistant exchanges, every third with a system turn, 3-60 words a message."""
    rng = random.Random(seed)

    def sent():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))).capitalize() + "."
    out = []
    for i in range(n):
        conv = [{"from": "system", "value": sent()}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 4)):
            conv += [{"from": "human", "value": sent()}, {"from": "gpt", "value": sent()}]
        out.append({"conversations": conv})
    return out


# run inside the code tree under test (cwd = that tree): what data.inspect does before printing, timed, then a
# digest of every example's ids + mask
WORKER = """
import hashlib, sys, time
from model import load_tokenizer
from data.batches import load_examples
t0 = time.perf_counter()
tok = load_tokenizer(sys.argv[1])
exs, st = load_examples(tok, [sys.argv[2]], 2048)
dt = time.perf_counter() - t0
h = hashlib.sha256()
for e in exs:
    h.update(e.ids.tobytes()); h.update(e.train.tobytes()); h.update(bytes([e.truncated]))
print(dt)
print(len(exs), st["tokens"], st["trained_tokens"], h.hexdigest())
"""


def run(tree: Path, args: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"{tree}: {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return dt, r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2, help="timed processes per side")
    ap.add_argument("--base", default="791baaf", help="the commit to compare the working tree with")
    ap.add_argument("--model", default=None, help="tokenizer dir (default: the real SmolLM2)")
    ap.add_argument("--new", default=str(REPO), help="the code tree to time against the base (default: this one)")
    a = ap.parse_args()
    if a.model is None:
        sys.path.insert(0, str(REPO))
        from model.gguf import default_model
        a.model = str(default_model())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        base.mkdir()
        subprocess.run(f"git -C {REPO} archive {a.base} | tar -x -C {base}", shell=True, check=True)
        data = tmp / "sharegpt.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_records(a.records)))
        (tmp / "worker.py").write_text(WORKER)
        sides = {f"base {a.base}": base, "new": Path(a.new)}
        times, walls, digests = ({k: [] for k in sides} for _ in range(3))
        order = list(sides)
        for r in range(a.rounds):
            for k in (order if r % 2 == 0 else order[::-1]):
                wall, out = run(sides[k], [str(tmp / "worker.py"), a.model, str(data)])
                t, digest = out.strip().splitlines()
                times[k].append(float(t))
                walls[k].append(wall)
                digests[k].append(digest)
                print(f"round {r} {k}: {float(t):.1f} s ({wall:.1f} s process); examples, tokens, trained tokens, "
                      f"sha256(ids + masks) = {digest}", flush=True)
        same = len({d for v in digests.values() for d in v}) == 1
        print("outputs identical (every round)" if same else "OUTPUTS DIFFER")
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                   platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
        print(f"\nmachine: {cpu}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}; {a.records} sharegpt records ({data.stat().st_size / 1e6:.1f} MB), "
              f"tokenizer {a.model}")
        print(f"timed: load_tokenizer + load_examples(seq_len 2048), as `python -m data.inspect --model M --data F "
              f"-n 0` runs it; a fresh process each, {a.rounds} per side, alternating\n")
        med = {k: statistics.median(v) for k, v in times.items()}
        b = med[order[0]]
        print("| code | median s | records/s | rounds (s) | process wall (s) | speed-up |")
        print("|---|---|---|---|---|---|")
        for k in order:
            print(f"| {k} | {med[k]:.1f} | {a.records / med[k]:.0f} | {', '.join(f'{t:.1f}' for t in times[k])} | "
                  f"{', '.join(f'{t:.1f}' for t in walls[k])} | {b / med[k]:.1f}x |")
        if not same:
            sys.exit("the two versions tokenise differently")


if __name__ == "__main__":
    main()
