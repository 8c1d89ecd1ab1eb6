"""A training run's state in its output directory, across processes and restarts: the checkpoints
(`<out>/checkpoints/step-N/`, each complete or absent, the last K kept; every rank takes part) and the metrics
log `metrics.jsonl` with what is drawn from it, loss.png and report.md (rank 0, dist/report.py).

A checkpoint holds what makes `--resume` continue bit-identically: the trainable weights and optimizer state
(written by the optimizer itself: AllReduceAdamW's trainable.safetensors + AdamW state, or ZeroOptimizer's
world-size independent zero.safetensors), the LR scheduler, every RNG state, and the step, which is also the
data position (train.py's batch order is a pure function of seed and step). It is written into
`.tmp-step-N` and renamed into place by model/atomic.py, so a run killed during a save keeps the previous one;
a manifest (sizes + BLAKE2 hashes of its files) written last lets `--resume` detect a damaged one and fall back.

The output directory itself is guarded (`check_out`, `claim_out`): it must be new, empty or made by nanotune
(a marker file), never the model's own directory; a run holds an OS lock on it for its whole life (released by
the kernel when the process dies, so a crash leaves no stale lock), and a second run into it is refused.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from model.atomic import atomic_dir
from model.progress import stage

from . import report


def save_checkpoint(out: Path, step: int, optimizer, scheduler, keep: int, rank: int = 0, config: dict | None = None):
    """Every rank calls it (a ZeRO optimizer gathers its shards in a collective); rank 0 writes the files.
    `config`: what the run's trajectory depends on, kept so that `--resume` can check it (`config_changes`)."""
    root = out / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    rng = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
           "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    every = [rng]  # each rank's RNG states (dropout masks differ per rank), gathered to rank 0's state.pt
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, rng)
    # only rank 0 creates and renames the directory; the others pass the same path to the optimizer's collective
    try:
        with stage(f"saving {final}"), \
                atomic_dir(final, tmp=tmp) if rank == 0 else contextlib.nullcontext(tmp) as tmp:
            state = optimizer.save(tmp, rank)
            if rank == 0:
                torch.save({**state, "scheduler": scheduler.state_dict(), **rng, "rank_rng": every},
                           tmp / "state.pt")
                (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config": config}) + "\n")
                write_manifest(tmp)
    except Exception as e:  # a full disk: OSError, torch.save's RuntimeError, safetensors' own error type
        if getattr(e, "errno", None) == errno.ENOSPC or any(m in str(e) for m in ("No space left", "os error 28",
                                                                                  "file write failed")):
            need = sum(f.stat().st_size for f in (root / f"step-{max(complete_checkpoints(out) or [0])}").glob("*")
                       if f.is_file())
            raise SystemExit(f"error: no space left on the device of {root} while writing step-{step}"
                             + (f" (the last checkpoint took {need / 2**20:.1f} MiB)" if need else "")
                             + "; the previous checkpoints are kept") from None
        raise
    if rank == 0:
        for old in complete_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(root / f"step-{old}")
        if (out / "metrics.jsonl").is_file():
            report.plot_soon(out)  # loss.png up to this step


def complete_checkpoints(out: Path) -> list[int]:
    """Steps of the complete checkpoints in `out`, ascending."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(d.name[5:]) for d in root.iterdir()
                  if d.name.startswith("step-") and d.name[5:].isdigit() and (d / "trainer_state.json").is_file())


def remove_partial(out: Path):
    """Drop what a save killed half-way left behind (its `.tmp-step-N`); the complete checkpoints stay."""
    for d in (out / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(d)


class DamagedCheckpoint(ValueError):
    """A checkpoint that can't be trusted (changed since written, unreadable, non-finite): `--resume` falls back
    to the one before it."""


def write_manifest(d: Path):
    """manifest.json: every file's size and BLAKE2b hash, written last (checked by verify_manifest)."""
    files = {f.name: {"bytes": f.stat().st_size, "blake2b": file_hash(f)} for f in sorted(d.iterdir()) if f.is_file()}
    (d / "manifest.json").write_text(json.dumps(files, indent=1) + "\n")


def verify_manifest(d: Path):
    """ValueError naming the first file of checkpoint dir `d` that is missing, resized or changed."""
    try:
        files = json.loads((d / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DamagedCheckpoint(f"{d}: no readable manifest.json ({type(e).__name__})") from None
    for name, want in files.items():
        f = d / name
        if not f.is_file() or f.stat().st_size != want["bytes"] or file_hash(f) != want["blake2b"]:
            raise DamagedCheckpoint(f"{f}: missing or changed since it was written (size/hash differ from its manifest)")


def file_hash(f: Path) -> str:
    """BLAKE2b-128 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.blake2b(digest_size=16)
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_config(out: Path, step: int) -> dict | None:
    """The trajectory config saved with checkpoint `step` (None for checkpoints written before it was)."""
    f = out / "checkpoints" / f"step-{step}" / "trainer_state.json"
    try:
        return json.loads(f.read_text()).get("config")
    except (OSError, ValueError, AttributeError) as e:
        raise DamagedCheckpoint(f"{f}: unreadable ({type(e).__name__})") from None


def config_changes(saved: dict | None, now: dict, allowed) -> list[str]:
    """`key: saved -> now` for every key whose value changed, except the `allowed` ones."""
    if saved is None:
        return []
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k) and k not in allowed]


def load_checkpoint(out: Path, step: int, optimizer, scheduler):
    """Every rank loads the same checkpoint (a ZeRO optimizer takes its own shard) after checking its manifest.
    Raises ValueError with one line for a damaged checkpoint or one the optimizer can't take (written
    with/without --zero, other parameter names), and for non-finite weights in it."""
    d = out / "checkpoints" / f"step-{step}"
    if (d / "manifest.json").exists() or not (d / "trainer_state.json").is_file():
        verify_manifest(d)
    try:
        st = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign state.pt: torch's unpickler raises many types
        raise DamagedCheckpoint(f"{d / 'state.pt'}: unreadable ({type(e).__name__})") from None
    optimizer.load(d, st)
    if not optimizer.finite():
        raise DamagedCheckpoint(f"{d}: holds non-finite (nan/inf) weights")
    scheduler.load_state_dict(st["scheduler"])
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rng = st["rank_rng"][rank] if len(st.get("rank_rng", [])) == world else st  # other world size: rank 0's
    torch.set_rng_state(rng["torch_rng"])
    if rng["cuda_rng"]:
        torch.cuda.set_rng_state_all(rng["cuda_rng"])
    random.setstate(_tuples(rng["python_rng"]))


def resume(out: Path, traj: dict, optimizer, scheduler, lr: float, allowed=()) -> int:
    """--resume: load the newest checkpoint that loads (a damaged one is reported and the one before it tried),
    once its trajectory settings equal this run's `traj`, but for the `allowed` keys (--resume-override). The
    LR schedule then follows this run's `lr`. Returns the step resumed from (0: there is no checkpoint)."""
    steps = complete_checkpoints(out)
    while steps:
        try:
            changes = config_changes(checkpoint_config(out, steps[-1]), traj, allowed)
            if changes:
                raise SystemExit(f"error: --resume: {out} was trained with other settings: {'; '.join(changes)} "
                                 f"(pass --resume-override {','.join(c.split(':')[0] for c in changes)} to go on "
                                 "with the new ones)")
            load_checkpoint(out, steps[-1], optimizer, scheduler)
        except DamagedCheckpoint as e:
            print(f"warning: {e}: trying the checkpoint before it", file=sys.stderr, flush=True)
            steps.pop()
            continue
        except ValueError as e:  # written with/without --zero, or parameter names that don't match
            raise SystemExit(f"error: {e}") from None
        scheduler.base_lrs = [lr] * len(scheduler.base_lrs)  # the same as saved unless --lr was overridden
        for g, f in zip(optimizer.optimizer.param_groups, scheduler.lr_lambdas):
            g["lr"] = lr * f(scheduler.last_epoch)
        return steps[-1]
    if complete_checkpoints(out):
        raise SystemExit(f"error: {out}: none of its checkpoints could be loaded")
    return 0


def trajectory(cfg, world: int, model, fingerprint: dict) -> dict:
    """The settings a run's trajectory depends on: saved with each checkpoint, checked by --resume, compared
    across ranks. Not: where it writes, how long it runs (--max-steps / --epochs may extend a run), evaluation,
    logging and saving cadence, nor how the same update is computed (micro-batches x ranks of one global batch,
    ZeRO, recomputation)."""
    skip = ("out", "max_steps", "epochs", "eval_data", "eval_every", "eval_samples", "eval_tasks", "eval_shots",
            "save_every", "keep", "resume", "resume_override", "merge", "log_every", "quiet", "config",
            "collective_timeout", "method_args",
            "batch_size", "grad_accum", "zero", "offload", "grad_checkpointing")  # the same update: see global_batch
    d = {k: v for k, v in asdict(cfg).items() if k not in skip}
    d["data"] = fingerprint  # data.fingerprint: every file (directories, dataset_info.json) with its size and hash
    pcfg = getattr(model, "peft_config", None)
    return {**d, "method_config": pcfg.to_json() if pcfg else None,
            "global_batch": cfg.batch_size * cfg.grad_accum * world}


def make_scheduler(optimizer, cfg, total_steps: int):
    """Linear warmup from 0, then cosine / linear decay to 0 or constant (HF's get_*_schedule_with_warmup).
    `optimizer` is the torch AdamW inside AllReduceAdamW / ZeroOptimizer (`.optimizer`)."""
    def factor(step):
        if step < cfg.warmup:
            return step / max(1, cfg.warmup)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup) / max(1, total_steps - cfg.warmup)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def same_on_all_ranks(traj: dict):
    """Every rank must run the same thing: a one-line error (on every rank) naming the first difference."""
    if not dist.is_initialized():
        return
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, traj)
    diff = next((r for r, t in enumerate(every) if t != every[0]), None)
    if diff is not None:
        raise SystemExit(f"error: rank {diff} has other settings than rank 0: "
                         + "; ".join(config_changes(every[0], every[diff], ())))


def _tuples(x):
    """random.getstate() comes back from torch.load with lists where it had tuples."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---- the output directory ----
MARKER = ".nanotune-run"  # says "nanotune made this directory"; also the lock file (holding the pid)


def check_out(out: Path, model: str):
    """Refuse, before anything is written, an --out that is not ours to write: the current directory, the
    model's own directory (or a folder inside it), a file, or a non-empty directory that nanotune did not make.
    Raises ValueError with one line naming what is there."""
    if str(out) in ("", "."):
        raise ValueError("--out: give an output directory (not the current directory)")
    o = out.resolve()
    if o == Path.cwd().resolve():
        raise ValueError(f"--out {out}: that is the current directory; give a new directory for the run")
    m = Path(model).resolve() if model else None
    if m is not None and (o == m or m in o.parents or (m.is_file() and o == m.parent)):
        raise ValueError(f"--out {out}: inside the model's own directory {model}; the run would write over it")
    if o.exists() and not o.is_dir():
        raise ValueError(f"--out {out}: is a file, not a directory")
    if o.is_dir() and not (o / MARKER).is_file():
        there = sorted(p.name for p in o.iterdir())
        if there:
            raise ValueError(f"--out {out}: holds files nanotune did not write ({', '.join(there[:4])}"
                             f"{', ...' if len(there) > 4 else ''}); give a new or empty directory")


def claim_out(out: Path):
    """Create --out (with the marker) and take its lock for the life of this process (rank 0 only). A second run
    into the same directory gets a one-line error with the first one's pid. Returns the lock's file object."""
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if key in _LOCKS:  # this process ran into `out` before (train.main called again in one process)
        _LOCKS.pop(key).close()
    f = open(out / MARKER, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise SystemExit(f"error: {out}: another run (pid {f.read().strip() or '?'}) is using it; "
                         "wait for it or give another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS[key] = f
    return f


_LOCKS = {}  # out dir -> this process's locked marker file


# ---- SIGTERM / SIGINT: finish the step, checkpoint, exit ----
class StopSignal:
    """Records SIGTERM (how SLURM and Kubernetes preempt) and SIGINT (Ctrl-C) instead of dying mid-step: the
    training loop asks `stop` after each step, saves a checkpoint and exits with 128 + the signal number. A
    second Ctrl-C stops at once."""

    def __init__(self):
        self.signum = 0
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:  # the second Ctrl-C: now
            os.write(2, b"interrupted again: exiting without a checkpoint\n")
            os._exit(130)
        self.signum = signum


class Logger:
    """metrics.jsonl (+ TensorBoard if installed), run.json, loss.png and report.md (dist/report.py), rank 0 only.
    loss.png is redrawn at each eval and checkpoint (report.plot_soon: at most every REDRAW_S seconds);
    `close(status)` ends the run's segment in run.json and writes both, also when a signal or a non-finite value
    stops the run."""

    def __init__(self, out: Path, resume_step: int, on: bool):
        self.on, self.out, self.f, self.tb, self.t0 = on, out, None, None, time.perf_counter()
        if not on:
            return
        report.last_drawn[out.resolve()] = time.monotonic()  # the first redraw REDRAW_S seconds in
        path = out / "metrics.jsonl"
        old = report.read_metrics(out) if resume_step else []
        keep = [r for r in old if r.get("step", 0) <= resume_step]  # drop steps redone after resume
        self.f = open(path, "w")
        self.f.write("".join(json.dumps(r) + "\n" for r in keep))
        try:  # optional: pip install tensorboard, then tensorboard --logdir <out>/tensorboard
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass

    def begin(self, cfg, stats: dict, model, world: int, train_ex, eval_ex, tok, start: int, total: int):
        """run.json: what this run knows once (report.run_info) and a new segment from step `start`."""
        if self.on:
            if not isinstance(train_ex, list):  # --stream: the data is counted as training goes, not up front
                stats = {k: 0 for k in ("records", "bad", "truncated", "no_target", "tokens", "trained_tokens")} \
                    | stats | {"streamed": True}
            n_train = len(train_ex) if isinstance(train_ex, list) else 0
            report.begin(self.out, report.run_info(cfg, stats, model, world, n_train, len(eval_ex), tok), start, total)

    def log(self, rec: dict):
        if not self.on:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        for k, v in rec.items() if self.tb else ():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, rec["step"])
        if "eval_loss" in rec:
            report.plot_soon(self.out)

    def close(self, status: str = ""):
        """Close the files; with `status` (how the run ended) also end run.json's segment and draw loss.png and
        report.md."""
        if self.f:
            self.f.close()
            self.f = None
        if self.tb:
            self.tb.close()
            self.tb = None
        if self.on and status:
            report.end(self.out, status, time.perf_counter() - self.t0)
            report.redraw(self.out)
