"""Does folding the LoRA A product into the frozen GEMM pay on this CPU? One LoRA linear at SmolLM2-135M's shapes,
forward + backward, fp32: peft.lora.LoraFunction (today's fused function) against variants that multiply
x by the stacked [W; A] (out + r, in) in one GEMM.

    python bench/bench_lora_fusion.py [--tokens 1024] [--ranks 8,16] [--repeats 7] [--iters 5] [--best] [--threads N]
                                      [--check-only]

Variants (all: y = x W^T + s (x A^T) B^T, the same backward maths as LoraFunction):
  current   LoraFunction: x W^T and x A^T as two products, backward g W + s (g B) A
  stacked   [W; A] stored as one buffer (W and A views of its rows): z = x [W; A]^T (N, out + r) in one GEMM,
            y = z[:, :out] + s z[:, out:] B^T (y a strided view of z); backward as `current`
  stack-bwd `stacked`, and the input gradient as one GEMM too: [g, s g B] [W; A] (a copy of g into (N, out + r))
  stack-AB  one (out + r, in + r) buffer M = [[W, B], [A, .]]: forward x M[:, :in]^T gives x W^T and x A^T,
            backward g M[:out] gives g W and g B (W, A, B strided views of M): both memory-bound reads of the
            (N, in) input and the (N, out) gradient folded into the frozen GEMMs
  cat       `stacked` with [W; A] concatenated on every call (what it costs without the stored layout)
  plain     the frozen linear alone (x W^T, g W), no LoRA: what any LoRA variant adds on top of it
Each case first checks every variant's output and gradients (x, A, B) against `current` (relative error <= 1e-5),
then times them in alternating order: --repeats rounds, each of --iters forward+backward passes per variant,
median per variant. "per layer" weights the shapes as one SmolLM2 block uses them (q, o: 576->576; k, v: 576->192;
gate, up: 576->1536; down: 1536->576).
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peft.lora import LoraFunction  # noqa: E402

SHAPES = {(576, 576): 2, (576, 192): 2, (576, 1536): 2, (1536, 576): 1}  # (in, out): uses per SmolLM2 block


class Layer:
    """What LoraFunction asks of its layer: compute_weight(dtype)."""
    def __init__(self, w):
        self.w = w

    def compute_weight(self, dtype):
        return self.w


class StackedLora(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T with W = wa[:out], A = wa[out:] (A is passed on its own so autograd routes its
    gradient): one (N, in) x (in, out + r) GEMM instead of two. cat_bwd: the input gradient as one GEMM too."""

    @staticmethod
    def forward(ctx, x, A, B, wa, s: float, cat_bwd: bool):
        shape, out = x.shape, B.shape[0]
        x2 = x.reshape(-1, shape[-1])                                       # (N, in)
        z = x2 @ wa.t()                                                     # (N, out + r)
        y, xa = z[:, :out], z[:, out:].clone()                              # xa kept apart: not all of z saved
        y.addmm_(xa, B.t(), alpha=s)                                        # (N, out), row stride out + r
        ctx.save_for_backward(x, A, B, xa, wa)
        ctx.s, ctx.cat_bwd = s, cat_bwd
        return y.view(*shape[:-1], out)

    @staticmethod
    def backward(ctx, g):
        x, A, B, xa, wa = ctx.saved_tensors
        s, out = ctx.s, B.shape[0]
        g2 = g.reshape(-1, out)                                             # (N, out)
        gb = g2 @ B                                                         # (N, r)
        if ctx.cat_bwd:
            gx = torch.cat([g2, gb * s], 1) @ wa                            # (N, in)
        else:
            gx = (g2 @ wa[:out]).addmm_(gb, A, alpha=s)
        x2 = x.reshape(-1, x.shape[-1])
        gA = (gb.t() @ x2).mul_(s)                                          # (r, in)
        gB = (xa.t() @ g2).mul_(s).t().contiguous()                         # (out, r)
        return gx.view(*g.shape[:-1], -1), gA, gB, None, None, None


class StackedABLora(torch.autograd.Function):
    """`stacked` in forward and g [W, B] as one GEMM in backward, over m = [[W, B], [A, .]] (out + r, in + r)."""

    @staticmethod
    def forward(ctx, x, A, B, m, s: float):
        shape, out, n_in = x.shape, B.shape[0], A.shape[1]
        z = x.reshape(-1, n_in) @ m[:, :n_in].t()                           # (N, out + r)
        y, xa = z[:, :out], z[:, out:].clone()
        y.addmm_(xa, B.t(), alpha=s)
        ctx.save_for_backward(x, A, B, xa, m)
        ctx.s = s
        return y.view(*shape[:-1], out)

    @staticmethod
    def backward(ctx, g):
        x, A, B, xa, m = ctx.saved_tensors
        s, out, n_in = ctx.s, B.shape[0], A.shape[1]
        g2 = g.reshape(-1, out)
        h = g2 @ m[:out]                                                    # (N, in + r)
        gx, gb = h[:, :n_in], h[:, n_in:].clone()
        gx.addmm_(gb, A, alpha=s)                                           # (N, in), row stride in + r
        gA = (gb.t() @ x.reshape(-1, n_in)).mul_(s)
        gB = (xa.t() @ g2).mul_(s).t().contiguous()
        return gx.view(*g.shape[:-1], n_in), gA, gB, None, None


def case(n_in, n_out, r, tokens, s=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    wa = torch.randn(n_out + r, n_in, generator=g) / n_in ** 0.5            # [W; A] as one buffer
    w = wa[:n_out]
    A = torch.nn.Parameter(wa[n_out:])                                      # a view of wa's rows: shares storage
    B = torch.nn.Parameter(torch.randn(n_out, r, generator=g) / r ** 0.5)
    m = torch.zeros(n_out + r, n_in + r)                                    # [[W, B], [A, 0]]
    m[:, :n_in], m[:n_out, n_in:] = wa, B.detach()
    A2, B2 = torch.nn.Parameter(m[n_out:, :n_in]), torch.nn.Parameter(m[:n_out, n_in:])
    x = torch.randn(tokens, n_in, generator=g, requires_grad=True)
    gy = torch.randn(tokens, n_out, generator=g)
    layer = Layer(w)
    variants = {
        "current": lambda: LoraFunction.apply(x, None, None, A, B, layer, s, torch.float32),
        "stacked": lambda: StackedLora.apply(x, A, B, wa, s, False),
        "stack-bwd": lambda: StackedLora.apply(x, A, B, wa, s, True),
        "stack-AB": lambda: StackedABLora.apply(x, A2, B2, m, s),
        "cat": lambda: StackedLora.apply(x, A, B, torch.cat([w, A.detach()]), s, False),
        "plain": lambda: x @ w.t(),
    }
    return variants, (x, A, B, A2, B2), gy


def run(fn, params, gy):
    for p in params:
        p.grad = None
    y = fn()
    y.backward(gy)
    gr = [None if p.grad is None else p.grad.clone() for p in params]  # x, A, B, and stack-AB's own A, B
    return y.detach(), [gr[0], gr[1] if gr[3] is None else gr[3], gr[2] if gr[4] is None else gr[4]]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(variants, params, gy) -> float:
    """Largest relative error of any variant's output or gradient against `current`."""
    y0, g0 = run(variants["current"], params, gy)
    worst = 0.0
    for name, fn in variants.items():
        if name == "plain":
            continue
        y, gr = run(fn, params, gy)
        errs = [rel(y, y0)] + [rel(a, b) for a, b in zip(gr, g0)]
        worst = max(worst, *errs)
        assert max(errs) <= 1e-5, f"{name}: relative errors (y, gx, gA, gB) {errs}"
    return worst


def timed(variants, params, gy, repeats, iters, best=False) -> dict:
    names = list(variants)
    times = {n: [] for n in names}
    for n in names:  # warm-up
        run(variants[n], params, gy)
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate who goes first
        for n in order:
            t = time.perf_counter()
            for _ in range(iters):
                run(variants[n], params, gy)
            times[n].append((time.perf_counter() - t) / iters)
    pick = min if best else statistics.median
    return {n: pick(v) for n, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--ranks", default="8,16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--best", action="store_true", help="the best round per variant instead of the median "
                    "(on a loaded machine: the rounds no other job slowed)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N = {a.tokens} tokens, fp32; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for r in map(int, a.ranks.split(",")):
        totals = {}
        if not a.check_only:
            print(f"\nr = {r}: ms per forward + backward ({'best' if a.best else 'median'} of {a.repeats} rounds "
                  f"of {a.iters})\n")
            print("| in -> out | uses | current | stacked | stack-bwd | stack-AB | cat | plain | LoRA share | "
                  "stacked gain |")
            print("|---|---|---|---|---|---|---|---|---|---|")
        for (n_in, n_out), uses in SHAPES.items():
            variants, params, gy = case(n_in, n_out, r, a.tokens)
            worst = check(variants, params, gy)
            if a.check_only:
                print(f"r={r} {n_in}->{n_out}: all variants within {worst:.1e} of current", flush=True)
                continue
            t = timed(variants, params, gy, a.repeats, a.iters, a.best)
            for n, v in t.items():
                totals[n] = totals.get(n, 0.0) + uses * v
            print(f"| {n_in}->{n_out} | {uses} | " + " | ".join(f"{1e3 * t[n]:.2f}" for n in variants) +
                  f" | {(t['current'] - t['plain']) / t['current']:.0%} | {1 - t['stacked'] / t['current']:+.1%} |",
                  flush=True)
        if totals:
            tc = totals["current"]
            print(f"| per layer | 7 | " + " | ".join(f"{1e3 * totals[n]:.2f}" for n in totals) +
                  f" | {(tc - totals['plain']) / tc:.0%} | {1 - totals['stacked'] / tc:+.1%} |")
            print("gain per layer: " + ", ".join(f"{n} {1 - totals[n] / tc:+.1%}" for n in totals if n != "current"))
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
