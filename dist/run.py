"""A training run's state in its output directory, across processes and restarts: the checkpoints
(`<out>/checkpoints/step-N/`, each complete or absent, the last K kept; every rank takes part) and the metrics
log `metrics.jsonl` with its loss plot (rank 0).

A checkpoint holds what makes `--resume` continue bit-identically: the trainable weights and optimizer state
(written by the optimizer itself: AllReduceAdamW's trainable.safetensors + AdamW state, or ZeroOptimizer's
world-size independent zero.safetensors), the LR scheduler, every RNG state, and the step, which is also the
data position (train.py's batch order is a pure function of seed and step). It is written into
`.tmp-step-N` and renamed into place by model/atomic.py, so a run killed during a save keeps the previous one.
"""
import contextlib
import json
import random
import shutil
from pathlib import Path

import torch

from model.atomic import atomic_dir


def save_checkpoint(out: Path, step: int, optimizer, scheduler, keep: int, rank: int = 0):
    """Every rank calls it (a ZeRO optimizer gathers its shards in a collective); rank 0 writes the files."""
    root = out / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    # only rank 0 creates and renames the directory; the others pass the same path to the optimizer's collective
    with atomic_dir(final, tmp=tmp) if rank == 0 else contextlib.nullcontext(tmp) as tmp:
        state = optimizer.save(tmp, rank)
        if rank == 0:
            torch.save({**state, "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                        "python_rng": random.getstate()}, tmp / "state.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step}) + "\n")
    if rank == 0:
        for old in complete_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(root / f"step-{old}")


def complete_checkpoints(out: Path) -> list[int]:
    """Steps of the complete checkpoints in `out`, ascending."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(d.name[5:]) for d in root.iterdir()
                  if d.name.startswith("step-") and (d / "trainer_state.json").is_file())


def remove_partial(out: Path):
    """Drop what a save killed half-way left behind (its `.tmp-step-N`); the complete checkpoints stay."""
    for d in (out / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(d)


def load_checkpoint(out: Path, step: int, optimizer, scheduler):
    """Every rank loads the same checkpoint (a ZeRO optimizer takes its own shard). Raises ValueError with one
    line for a checkpoint the optimizer can't take (written with/without --zero, other parameter names)."""
    d = out / "checkpoints" / f"step-{step}"
    st = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load(d, st)
    scheduler.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["torch_rng"])
    if st["cuda_rng"]:
        torch.cuda.set_rng_state_all(st["cuda_rng"])
    random.setstate(_tuples(st["python_rng"]))


def _tuples(x):
    """random.getstate() comes back from torch.load with lists where it had tuples."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class Logger:
    """metrics.jsonl (+ TensorBoard if installed) and loss.png (if matplotlib is), rank 0 only."""

    def __init__(self, out: Path, resume_step: int, on: bool):
        self.on, self.f, self.tb = on, None, None
        if not on:
            return
        path = out / "metrics.jsonl"
        old = path.read_text().splitlines() if resume_step and path.exists() else []
        keep = [l for l in old if json.loads(l).get("step", 0) <= resume_step]  # drop steps redone after resume
        self.f = open(path, "w")
        self.f.write("".join(l + "\n" for l in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass

    def log(self, rec: dict):
        if not self.on:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        for k, v in rec.items() if self.tb else ():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, rec["step"])

    def close(self):
        if self.f:
            self.f.close()
        if self.tb:
            self.tb.close()


def plot_loss(out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    plt.figure(figsize=(6, 4))
    plt.plot(*zip(*tr), label="train")
    if ev:
        plt.plot(*zip(*ev), "o-", label="eval")
    plt.xlabel("step"), plt.ylabel("loss"), plt.legend(), plt.tight_layout()
    plt.savefig(out / "loss.png")
