"""Eval throughput (questions/s): eval.py vs lm-eval-harness (HF backend, fp32, batch 8) on the same task,
SmolLM2-135M-Instruct, CPU, in alternating rounds (ours, lm-eval, ours, ...).

    python bench/bench_eval.py [--rounds 2] [--shots 2] [--tasks data/eval/nano_facts.jsonl]

lm-eval runs in a subprocess outside the repo (tests/reference.py run_lm_eval); its time is simple_evaluate's
wall time (model load ~1 s and request building included), ours score_tasks' (model loaded before). Both use
the same torch thread count. The per-choice log-likelihoods of every round are checked equal (<= 1e-4).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as E  # noqa: E402
import model as M  # noqa: E402
from model.gguf import default_model  # noqa: E402
from tests.reference import run_lm_eval  # noqa: E402

THREADS = 2


def main():
    global THREADS
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads (the same for every side)")
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--tasks", default="data/eval/nano_facts.jsonl")
    a = ap.parse_args()
    THREADS = a.threads
    torch.set_num_threads(THREADS)
    torch.set_grad_enabled(False)
    path = str(default_model())
    model, tok = M.load_pretrained(path), M.load_tokenizer(path)
    tasks = E.load_tasks(a.tasks, a.shots)
    name = next(iter(tasks))
    n = len(tasks[name]["records"])
    load0, ours, theirs, err = os.getloadavg()[0], [], [], 0.0
    for _ in range(a.rounds):
        t = time.perf_counter()
        res = E.score_tasks(model, tok, tasks, per_choice=True)
        ours.append(time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as d:
            ref = run_lm_eval(d, path, {name: (a.tasks, a.shots)}, threads=THREADS)
        theirs.append(ref["seconds"])
        err = max(err, max(abs(x - y) for o, r in zip(res[f"{name}/logliks"], ref[name]["logliks"])
                           for x, y in zip(o, r)))
        assert res[f"{name}/acc"] == ref[name]["acc"] and res[f"{name}/acc_norm"] == ref[name]["acc_norm"]
    mo, mt = statistics.median(ours), statistics.median(theirs)
    print(f"\n{name}, {n} questions, {a.shots}-shot, SmolLM2-135M fp32, {THREADS} threads, {a.rounds} rounds "
          f"(medians); acc {res[name + '/acc']:.3f}, acc_norm {res[name + '/acc_norm']:.3f} (both); "
          f"max |ll ours - lm-eval| {err:.1e}\n")
    print("| | seconds | questions/s |\n|---|---|---|")
    print(f"| eval.py | {mo:.1f} | {n / mo:.2f} |")
    print(f"| lm-eval 0.4.13 (HF, batch 8) | {mt:.1f} | {n / mt:.2f} |")
    print(f"| ratio | {mt / mo:.1f}x faster | |")
    print(f"\nrounds: ours {[round(x, 1) for x in ours]} s, lm-eval {[round(x, 1) for x in theirs]} s; "
          f"1-minute load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
