"""Time to the first optimizer step and peak RSS of train.py against the size of its JSONL file, eager (every record
tokenised before the first step, the default) vs --stream (tokenised as training goes).

    python bench/bench_stream.py [--sizes 10,100,1000] [--eager-max-mb 100] [--timeout 900] [--model DIR]

The file is bench_data.py's synthetic multi-turn sharegpt records repeated to each size (MB); each run is a fresh
`train.py --method lora --max-steps 1 --batch-size 1 --seq-len 256` process on SmolLM2-135M-Instruct (the real
tokenizer and template) whose first train_step is timed from process start; peak RSS is the process's ru_maxrss
(which also counts this parent's peak, kept small: the file is written in ~6 MB blocks).
Eager runs above --eager-max-mb are not run (their time grows with the file: see the 10 / 100 MB rows).
"""
import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import make_records  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PATCH = """
import resource, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {repo!r})
import train
orig = train.train_step
def step(*a, **k):
    out = orig(*a, **k)
    print("FIRST_STEP", time.perf_counter() - t0, "RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
    return out
train.train_step = step
train.main({argv!r})
"""


def write(path: Path, mb: int):
    block = "".join(json.dumps(r) + "\n" for r in make_records(5000))
    with open(path, "w") as f:
        for _ in range(-(-mb * (1 << 20) // len(block))):  # whole blocks, at least mb MB
            f.write(block)
    return path.stat().st_size


def run(data, out, stream, model, timeout):
    argv = ["--data", str(data), "--out", str(out), "--method", "lora", "--max-steps", "1", "--batch-size", "1",
            "--seq-len", "256", *(["--model", model] if model else []), *(["--stream"] if stream else [])]
    try:
        r = subprocess.run([sys.executable, "-c", PATCH.format(repo=str(REPO), argv=argv)], capture_output=True,
                           text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return None
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("FIRST_STEP")), None)
    if line is None:
        raise RuntimeError(r.stderr[-2000:])
    _, t, _, rss = line.split()
    return float(t), int(rss) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--eager-max-mb", type=int, default=100)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--model", default="")
    a = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print("| file | mode | time to first step (s) | peak RSS (MB) |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for mb in map(int, a.sizes.split(",")):
            f = d / f"{mb}.jsonl"
            size = write(f, mb)
            for stream in (False, True):
                if not stream and mb > a.eager_max_mb:
                    print(f"| {size / 1e6:.0f} MB | eager | not run | |", flush=True)
                    continue
                res = run(f, d / f"out-{mb}-{stream}", stream, a.model, a.timeout)
                cell = f"{res[0]:.1f} | {res[1]:.0f}" if res else f"> {a.timeout} (timed out) |"
                print(f"| {size / 1e6:.0f} MB | {'--stream' if stream else 'eager'} | {cell} |", flush=True)
            f.unlink()


if __name__ == "__main__":
    main()
