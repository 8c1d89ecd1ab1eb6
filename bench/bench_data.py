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


# run inside the code tree under test (cwd = that tree): load, then print a digest of every example's ids + mask
DIGEST = """
import hashlib, sys
from model import load_tokenizer
from data.batches import load_examples
tok = load_tokenizer(sys.argv[1])
exs, st = load_examples(tok, [sys.argv[2]], 2048)
h = hashlib.sha256()
for e in exs:
    h.update(e.ids.tobytes()); h.update(e.train.tobytes()); h.update(bytes([e.truncated]))
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
    ap.add_argument("--rounds", type=int, default=3, help="timed processes per side")
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
        (tmp / "digest.py").write_text(DIGEST)
        sides = {f"base {a.base}": base, "new": Path(a.new)}
        digests = {k: run(t, [str(tmp / "digest.py"), a.model, str(data)])[1].strip() for k, t in sides.items()}
        for k, d in digests.items():
            print(f"{k}: examples, tokens, trained tokens, sha256(ids + masks) = {d}")
        same = len(set(digests.values())) == 1
        print("outputs identical" if same else "OUTPUTS DIFFER")
        cmd = ["-m", "data.inspect", "--model", a.model, "--data", str(data), "-n", "0"]
        times = {k: [] for k in sides}
        order = list(sides)
        for r in range(a.rounds):
            for k in (order if r % 2 == 0 else order[::-1]):
                times[k].append(run(sides[k], cmd)[0])
        print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}; {a.records} sharegpt records ({data.stat().st_size / 1e6:.1f} MB), "
              f"tokenizer {a.model}")
        print(f"command: python -m data.inspect --model M --data F -n 0 (fresh process each, {a.rounds} per side, "
              f"alternating)\n")
        med = {k: statistics.median(v) for k, v in times.items()}
        b = med[order[0]]
        print("| code | median s | records/s | rounds (s) | speed-up |")
        print("|---|---|---|---|---|")
        for k in order:
            print(f"| {k} | {med[k]:.2f} | {a.records / med[k]:.0f} | {', '.join(f'{t:.2f}' for t in times[k])} | "
                  f"{b / med[k]:.2f}x |")
        if not same:
            sys.exit("the two versions tokenise differently")


if __name__ == "__main__":
    main()
