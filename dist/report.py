"""What a run did, on one page: `loss.png` and `report.md` in its output directory, drawn from the files the run
keeps there, for any run (finished, stopped, resumed, or still going):

    python -m dist.report RUN_DIR [RUN_DIR ...]     # redraw loss.png and report.md

metrics.jsonl is the source of truth of every curve and figure (one record per logged step: loss, lr, grad_norm,
tokens, trained_tokens, tokens_per_s; one per eval: eval_loss, eval_ppl, samples; any other number a method logs,
e.g. rewards/margins or eval_accuracy, gets its own panel). config.json is the resolved config; run.json what is
known once per run: the data summary, the model's size and FLOPs per token, the sample prompts, and per segment
(the first run and each --resume) its steps, end, wall time and peak memory. train.py writes them through
dist.run.Logger, which redraws loss.png at each eval and checkpoint and both files when the run ends: finished,
stopped by a signal, or stopped by a non-finite loss / gradient / weight.
"""
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from model.atomic import atomic_file
from model.ops import resolve_precision

# metrics.jsonl keys drawn in the main panel or bookkeeping; every other number gets a panel of its own
MAIN = ("step", "loss", "lr", "grad_norm", "tokens", "trained_tokens", "tokens_per_s", "eval_loss", "eval_ppl")
REDRAW_S = 10.0  # plot_soon: seconds between two drawings of a running run's loss.png
last_drawn = {}      # resolved out dir -> time.monotonic() of its last drawing in this process
MAX_PANELS = 6  # extra-metric panels drawn below the loss (the report lists all of them)
# dense GEMM peaks (FLOP/s) from the vendors' datasheets, by device-name substring (first match) and precision;
# NANOTUNE_GEMM_PEAK_TFLOPS=X gives the peak of any other device (e.g. one measured with bench/bench_train.py)
GEMM_PEAKS = {"H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
              "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
              "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
              "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}}


# ----------------------------------------------------------------------------------------- the run's files
def read_metrics(out: Path) -> list[dict]:
    """metrics.jsonl's records (a torn last line, from a process killed mid-write, is skipped)."""
    path = Path(out) / "metrics.jsonl"
    recs = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return recs


def split(recs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(step records, eval records), each in step order, one per step (a step logged twice: the later one)."""
    steps = {r["step"]: r for r in recs if "loss" in r}
    evals = {r["step"]: r for r in recs if "eval_loss" in r}
    return [steps[s] for s in sorted(steps)], [evals[s] for s in sorted(evals)]


def extra_keys(recs: list[dict]) -> list[str]:
    """Numeric keys beyond the main ones (a method's own metrics), in first-seen order."""
    keys = {}
    for r in recs:
        keys.update({k: 1 for k, v in r.items() if k not in MAIN and _number(v)})
    return list(keys)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, obj):
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


# -------------------------------------------------------------------------------- what train.py records once
def run_info(cfg, stats: dict, model, world: int, n_train: int, n_eval: int, tok) -> dict:
    """run.json's fixed part: the data summary, the model's size, FLOPs per token and GEMM peak, the prompts of
    the eval sample answers."""
    import peft
    base = peft.unwrap(model)
    device = next(model.parameters()).device
    prec = resolve_precision(cfg.precision, device)
    frac = stats["trained_tokens"] / max(stats["tokens"], 1)
    ctx = base.cfg.max_position_embeddings
    warnings = [w for w, n in (
        (f"{stats['truncated']} examples longer than --seq-len {cfg.seq_len} were truncated (their ends are not "
         "trained)", stats["truncated"]),
        (f"{stats['no_target']} examples had no trained tokens and were dropped", stats["no_target"]),
        (f"{stats['bad']} malformed records were skipped (--skip-bad-records)", stats["bad"]),
        (f"{stats.get('prompt_truncated')} preference records whose completion starts past --seq-len were dropped",
         stats.get("prompt_truncated")),
        (f"--seq-len {cfg.seq_len} exceeds the model's context ({ctx} positions)", cfg.seq_len > ctx)) if n]
    return {"model": {"path": cfg.model, "method": cfg.method, "precision": prec, "world": world,
                      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                      "params": sum(p.numel() for p in model.parameters()),
                      "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "flops_per_token": flops_per_token(base, cfg.method == "full", frac),
                      "gemm_peak_flops": gemm_peak(device, prec)},
            "data": {"records": stats["records"] + stats["bad"], "bad": stats["bad"], "train_examples": n_train,
                     "eval_examples": n_eval, "truncated": stats["truncated"], "no_target": stats["no_target"],
                     "tokens": stats["tokens"], "trained_tokens": stats["trained_tokens"], "seq_len": cfg.seq_len,
                     "pack": cfg.pack, "streamed": stats.get("streamed", False), "warnings": warnings},
            "prompts": [tok.decode(p).strip() for p in stats.get("prompts", [])]}


def flops_per_token(base, full: bool, trained_frac: float) -> float:
    """Model FLOPs per token of one training step (Kaplan et al. 2020, C = 6N per token): 2N for the forward, 2N for
    the gradient with respect to the activations, and 2N more for the weight gradients when the base itself trains
    (full fine-tuning; a frozen base with an adapter skips them). N: the decoder blocks' matrices, plus the LM head
    at the trained positions only (where nanotune computes logits). Attention's T^2 term is left out (a few % at
    T <= 512 for models of this size)."""
    body = sum(p.numel() for n, p in base.named_parameters() if ".layers." in n and p.dim() == 2)
    head = base.lm_head.weight.numel()
    return (6 if full else 4) * (body + head * trained_frac)


def gemm_peak(device, precision: str) -> float | None:
    """The device's dense GEMM peak in FLOP/s for `precision`, where known (GEMM_PEAKS, NANOTUNE_GEMM_PEAK_TFLOPS)."""
    env = os.environ.get("NANOTUNE_GEMM_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((p[precision] for k, p in GEMM_PEAKS.items() if k in name), None)
    return None


def peak_memory() -> tuple[int, str]:
    """(bytes, what was measured): CUDA's peak allocation, else the process's peak resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated(), "CUDA allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS"


def begin(out: Path, info: dict, start: int, total: int):
    """run.json for a run starting at step `start` (0, or the step it resumed from): `info` (run_info) and a new
    segment; a resumed run keeps the segments before it."""
    old = _json(out / "run.json") if start else {}
    segments = [s for s in old.get("segments", []) if s["from_step"] < start]
    seg = {"from_step": start, "to_step": total, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    _write_json(out / "run.json", {**info, "segments": segments + [seg]})


def end(out: Path, status: str, wall_s: float):
    """Close run.json's last segment: how it ended, its wall time and peak memory."""
    run = _json(out / "run.json")
    if not run.get("segments"):
        return
    mem, kind = peak_memory()
    steps, _ = split(read_metrics(out))
    run["segments"][-1].update(status=status, last_step=steps[-1]["step"] if steps else 0, wall_s=round(wall_s, 3),
                               peak_memory_bytes=mem, peak_memory=kind)
    _write_json(out / "run.json", run)


# --------------------------------------------------------------------------------------------------- loss.png
def smooth(xs: list[float]) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing) with a span of a tenth of the points, 1 (no
    smoothing) to 50: the curve drawn over the raw losses."""
    a = 1 - 2 / (min(50, max(1, len(xs) // 10)) + 1)
    out, m = [], 0.0
    for i, x in enumerate(xs, 1):
        m = a * m + (1 - a) * x
        out.append(m / (1 - a ** i) if a else x)
    return out


def plot(out: Path):
    """loss.png: train loss (raw and smoothed) and eval loss against the step, the learning rate on a second axis,
    and a panel for each extra metric. Agg, no pyplot (no global state); written atomically. Returns the matplotlib
    Figure, or None (and a warning) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("warning: matplotlib is not installed: no loss.png (pip install matplotlib)", file=sys.stderr)
        return None
    recs = read_metrics(out)
    steps, evals = split(recs)
    extra = extra_keys(recs)[:MAX_PANELS]
    fig = Figure(figsize=(8, 4.5 + 2 * len(extra)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1 + len(extra), 1, sharex=True, squeeze=False, height_ratios=[2.2] + [1] * len(extra))[:, 0]
    ax = axes[0]
    if steps:
        x, y = [r["step"] for r in steps], [r["loss"] for r in steps]
        ax.plot(x, y, color="tab:blue", alpha=0.3, lw=1, label="train loss")
        ax.plot(x, smooth(y), color="tab:blue", lw=2, label="train loss (smoothed)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="tab:orange", ms=5,
                label="eval loss")
    losses = [r["loss"] for r in steps] + [r["eval_loss"] for r in evals]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 30:
        ax.set_yscale("log")  # a loss falling by orders of magnitude (memorising a small set)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if steps:
        lr = ax.twinx()
        lr.plot([r["step"] for r in steps], [r["lr"] for r in steps], "--", color="tab:gray", lw=1, label="lr")
        lr.set_ylabel("learning rate")
        lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        handles = ax.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no step logged yet", ha="center", va="center", transform=ax.transAxes)
    for a, key in zip(axes[1:], extra):
        pts = [(r["step"], r[key]) for r in recs if _number(r.get(key))]
        style = "o-" if all("eval_loss" in r for r in recs if key in r) else "-"
        a.plot(*zip(*pts), style, ms=4, color="tab:green")
        a.set_ylabel(key, fontsize=8)
        a.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    cfg = _json(out / "config.json")
    ax.set_title(f"{Path(out).name}: {cfg.get('method', '?')} on {Path(cfg.get('model') or '?').name}", fontsize=10)
    h = fig.get_figheight()  # fixed margins (in inches): tight_layout would cost a third of the drawing time
    fig.subplots_adjust(left=0.09, right=0.89, top=1 - 0.35 / h, bottom=0.5 / h, hspace=0.15)
    with atomic_file(out / "loss.png") as tmp:
        fig.savefig(tmp, format="png")
    last_drawn[Path(out).resolve()] = time.monotonic()
    return fig


def plot_soon(out: Path):
    """plot(out) during a run (at an eval, a checkpoint), unless it was drawn less than REDRAW_S seconds ago: a
    short run is drawn once, at its end."""
    if time.monotonic() - last_drawn.get(Path(out).resolve(), -math.inf) >= REDRAW_S:
        plot(out)


# -------------------------------------------------------------------------------------------------- report.md
def g(x: float) -> str:
    """The report's number format (4 significant digits)."""
    return f"{x:.4g}"


def _duration(s: float) -> str:
    s = round(s)
    return f"{s // 3600} h {s // 60 % 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def _segment(s: dict) -> str:
    if "status" not in s:
        return f"| {s['from_step']} → ? | no end recorded (killed) | ? | ? |"
    return (f"| {s['from_step']} → {s['last_step']} | {s['status']} | {_duration(s['wall_s'])} | "
            f"{s['peak_memory_bytes'] / 2**30:.2f} GiB |")


def _commands(out: Path, cfg: dict) -> list[str]:
    """The exact commands that use what the run saved."""
    o, method = Path(out), cfg.get("method")
    lines = []
    if (o / "adapter").is_dir():
        lines += ["# chat with the fine-tuned model (the adapter on its base)",
                  f"python generate.py --adapter {o / 'adapter'}"]
    if (o / "model").is_dir():
        lines += ["# chat with the " + ("fine-tuned" if method == "full" else "merged") + " model (an HF directory)",
                  f"python generate.py --model {o / 'model'}"]
    if (o / "adapter").is_dir() and not (o / "model").is_dir() and method in ("lora", "dora", "ia3", "bitfit"):
        base = cfg.get("model", "")
        lines += ["# merge the adapter into its base: an HF directory transformers loads",
                  f"python -c \"import model as M, peft; m = peft.merge_and_unload(peft.load_adapter("
                  f"M.load_pretrained('{base}'), '{o / 'adapter'}')); M.save_pretrained(m, '{o / 'merged'}'); "
                  f"M.load_tokenizer('{base}').save('{o / 'merged'}')\""]
    if (o / "model").is_dir() or (o / "adapter").is_dir() and method in ("lora", "dora", "ia3", "qlora"):
        src = f"{o / 'model'}" if (o / "model").is_dir() else \
            f"{cfg.get('model', '')} --adapter {o / 'adapter'}" + (" --qlora" if method == "qlora" else "")
        lines += ["# export for llama.cpp / Ollama (GGUF; adapters merged first), or serve it (OpenAI API + chat page)",
                  f"python export.py {src} {o / 'model.gguf'} --type q8_0"]
        lines += [f"python serve.py --model {o / 'model'}" if (o / "model").is_dir() else
                  f"python serve.py --model {cfg.get('model', '')} --adapter ft={o / 'adapter'}"]
    if not lines:
        lines = ["# nothing final was saved (the run stopped early): continue it with the same command and --resume"]
    return lines


def write_report(out: Path) -> Path:
    """report.md from metrics.jsonl, config.json and run.json (whatever of them exists)."""
    out = Path(out)
    recs, cfg, run = read_metrics(out), _json(out / "config.json"), _json(out / "run.json")
    steps, evals = split(recs)
    info, data, segs = run.get("model", {}), run.get("data", {}), run.get("segments", [])
    last = segs[-1] if segs else {}
    total = last.get("to_step", cfg.get("max_steps") or "?")
    status = last.get("status") or "running, or killed before it could say (no end recorded)"
    at = steps[-1]["step"] if steps else 0
    L = [f"# Training report: {out}", "",
         f"`{cfg.get('method', '?')}` on `{cfg.get('model', '?')}`: **{status}**, step {at} of {total}.", ""]
    if (out / "loss.png").is_file():
        L += ["![loss and learning rate](loss.png)", ""]
    rows = [("steps", f"{at} of {total} ({len(steps)} logged)")]
    if steps:
        low = min(steps, key=lambda r: r["loss"])
        rows += [("train loss", f"{g(steps[0]['loss'])} at step {steps[0]['step']} → {g(steps[-1]['loss'])} at step "
                  f"{at} (smoothed {g(smooth([r['loss'] for r in steps])[-1])}; lowest {g(low['loss'])} at step "
                  f"{low['step']})")]
    if evals:
        e = evals[-1]
        ppl = f" (perplexity {g(e['eval_ppl'])})" if "eval_ppl" in e else ""  # not for a classifier's loss
        rows += [("eval loss", f"{g(e['eval_loss'])}{ppl} at step {e['step']}")]
    for k in extra_keys(recs):
        r = [x for x in recs if _number(x.get(k))][-1]
        rows += [(k, f"{g(r[k])} at step {r['step']}")]
    if steps:
        tps = statistics.median(r["tokens_per_s"] for r in steps)
        rows += [("trained tokens", f"{sum(r['trained_tokens'] for r in steps):,} (sum over the {len(steps)} logged "
                  "steps)"),
                 ("throughput", f"{g(tps)} tokens/s (median over the logged steps; {info.get('world', '?')} "
                  f"process{'es' * (info.get('world') != 1)}, {info.get('device', '?')}, "
                  f"{info.get('precision', '?')})")]
        peak, fpt = info.get("gemm_peak_flops"), info.get("flops_per_token")
        rows += [("MFU", f"{g(100 * tps * fpt / peak)}% ({g(fpt / 1e9)} GFLOP/token × {g(tps)} tokens/s of a "
                  f"{g(peak / 1e12)} TFLOP/s GEMM peak)" if peak and fpt else
                  "n/a: no GEMM peak known for this device (set NANOTUNE_GEMM_PEAK_TFLOPS to give one)")]
    if "peak_memory_bytes" in last:
        rows += [("peak memory", f"{last['peak_memory_bytes'] / 2**30:.2f} GiB ({last['peak_memory']})")]
    if any("wall_s" in s for s in segs):
        rows += [("wall time", _duration(sum(s.get("wall_s", 0) for s in segs))
                  + (f" over {len(segs)} segments" if len(segs) > 1 else ""))]
    if info:
        rows += [("parameters", f"{info['trainable_params']:,} trainable of {info['params']:,} "
                  f"({100 * info['trainable_params'] / max(info['params'], 1):.4f}%)")]
    L += ["## Results", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    if data:
        L += ["## Data", "", "| | |", "|---|---|",
              f"| training records | {data['records']:,} ({data['bad']} malformed skipped) |",
              (f"| examples | streamed (--stream: tokenised as training went) / {data['eval_examples']:,} eval |"
               if data.get("streamed") else f"| examples | {data['train_examples']:,} train / "
               f"{data['eval_examples']:,} eval" + (" (after packing)" if data.get("pack") else "") + " |"),
              f"| tokens per epoch | {data['tokens']:,} ({data['trained_tokens']:,} trained, "
              f"{100 * data['trained_tokens'] / max(data['tokens'], 1):.1f}%) |",
              f"| truncated to --seq-len {data['seq_len']} | {data['truncated']} |",
              f"| dropped (no trained tokens) | {data['no_target']} |", ""]
        L += ["Warnings:" if data["warnings"] else "Warnings: none.", *[f"- {w}" for w in data["warnings"]], ""]
    if evals:
        L += ["## Evaluation", "", "| step | eval loss | perplexity |", "|---|---|---|"]
        L += [f"| {e['step']} | {g(e['eval_loss'])} | {g(e.get('eval_ppl', math.nan))} |" for e in evals] + [""]
        samples = evals[-1].get("samples") or []
        if samples:
            L += [f"Sample answers at step {evals[-1]['step']} (greedy):", ""]
            for q, a in zip(run.get("prompts") or ["?"] * len(samples), samples):
                L += ["```text", q[-300:], "```", "", "> " + (a.replace("\n", "\n> ") or "(empty)"), ""]
    if (out / "before_after.txt").is_file():
        L += ["## Before / after (before_after.txt)", "", "```text",
              (out / "before_after.txt").read_text().rstrip(), "```", ""]
    L += ["## Use the result", "", "```bash", *_commands(out, cfg), "```", ""]
    L += ["The adapter (`adapter/`) is in HF PEFT's format (`PeftModel.from_pretrained(base, dir)` loads it); "
          "`model/` is an HF directory (`AutoModelForCausalLM.from_pretrained(dir)`).", ""]
    if len(segs) > 1:
        L += ["## Segments (the run and each --resume)", "", "| steps | ended | wall time | peak memory |",
              "|---|---|---|---|"] + [_segment(s) for s in segs] + [""]
    if cfg:
        L += ["<details><summary>Resolved config (config.json)</summary>", "", "```json",
              json.dumps(cfg, indent=2), "```", "</details>", ""]
    L += [f"Redraw this page and loss.png: `python -m dist.report {out}`", ""]
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text("\n".join(L))
    return out / "report.md"


def redraw(out: Path):
    """loss.png (where matplotlib is installed), then report.md."""
    plot(Path(out))
    return write_report(Path(out))


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="Redraw a run's loss.png and report.md from its metrics.jsonl.")
    ap.add_argument("run_dir", nargs="+", help="a train.py --out directory")
    for d in map(Path, ap.parse_args(argv).run_dir):
        if not (d / "metrics.jsonl").is_file():
            sys.exit(f"error: {d}: no metrics.jsonl (not a train.py output directory?)")
        print(f"wrote {redraw(d)} and {d / 'loss.png'}")


if __name__ == "__main__":
    main()
