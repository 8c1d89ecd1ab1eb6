"""Where model/ops.py's CPU packed attention switches from one masked SDPA call to the per-example loop
(LOOP_PAIRS_PER_CALL): forward + backward of packed rows of random lengths, SmolLM2's heads (9 query, 3 KV, 64).

    python bench/bench_attention.py [--reps 5]

Each case prints the pairs the loop avoids per call it makes, (B T^2 - sum n_i^2) / n_examples, and the best of
--reps timings of each branch; the loop should win exactly where that figure is >= LOOP_PAIRS_PER_CALL.
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import ops  # noqa: E402

CASES = ((8, 128, 16, 64), (4, 512, 64, 256), (4, 512, 128, 512), (2, 768, 96, 384), (2, 1024, 64, 256),
         (2, 1024, 128, 512), (1, 2048, 128, 512), (1, 4096, 256, 1024))  # B, T, shortest, longest example


def lengths(B, T, lo, hi, seed=0):
    rng, rows = random.Random(seed), []
    for _ in range(B):
        row = []
        while sum(row) < T:
            row.append(min(rng.randint(lo, hi), T - sum(row)))
        rows.append(row)
    return rows


def best(segs, q, k, v, reps, pairs):
    ops.LOOP_PAIRS_PER_CALL, saved = pairs, ops.LOOP_PAIRS_PER_CALL
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        ops.attention(q, k, v, segs).sum().backward()
        times.append(time.perf_counter() - t)
    ops.LOOP_PAIRS_PER_CALL = saved
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(2)
    print(f"LOOP_PAIRS_PER_CALL = {ops.LOOP_PAIRS_PER_CALL}\n")
    print("| B x T | examples | pairs avoided per call | loop s | one masked call s | faster | chosen |")
    print("|---|---|---|---|---|---|---|")
    for B, T, lo, hi in CASES:
        segs = ops.Segments(lengths(B, T, lo, hi))
        q, k, v = (torch.randn(B, h, T, 64, requires_grad=True) for h in (9, 3, 3))
        loop, dense = best(segs, q, k, v, a.reps, 0), best(segs, q, k, v, a.reps, float("inf"))
        print(f"| {B}x{T} | {segs.calls} | {segs.avoided / segs.calls / 1e3:.0f}k | {loop:.3f} | {dense:.3f} | "
              f"{'loop' if loop < dense else 'mask'} | {'loop' if segs.loop_pays() else 'mask'} |", flush=True)


if __name__ == "__main__":
    main()
