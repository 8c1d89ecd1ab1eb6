"""Progress of the long steps (training, tokenising and packing, evaluating, saving and merging, GGUF conversion):
a tqdm bar when stderr is a terminal; plain lines on stderr when it is not (a log file or a pipe: no carriage
returns, one line every INTERVAL seconds and one at the end); nothing under `quiet()` (train.py --quiet,
data.inspect --quiet, and every rank but 0).

    for rec in progress(records, "tokenising", unit="rec"): ...
    with stage("saving checkpoints/step-10"): ...    # one long call with no loop to count

Only work that has taken longer than DELAY seconds shows anything, so a small run prints what it printed before.
"""
import contextlib
import sys
import threading
import time

from tqdm import tqdm

DELAY = 1.0      # seconds before a bar or a stage line appears
INTERVAL = 10.0  # seconds between two plain lines
_quiet = False
write = tqdm.write  # print a line without breaking a bar (stdout, like print)


def quiet(on: bool = True):
    """Silence every bar, line and stage of this process (or bring them back with quiet(False))."""
    global _quiet
    _quiet = bool(on)


def progress(iterable=None, desc: str = "", total=None, unit: str = "it", delay: float | None = None,
             initial: int = 0, leave: bool = True):
    """A tqdm-like bar over `iterable` (iterate it, or call update(n)); set_postfix(**kw) adds fields. leave=False:
    a terminal bar disappears when done (one nested in another); plain lines always end with a last one."""
    delay = DELAY if delay is None else delay
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if _quiet:
        return tqdm(iterable, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, delay=delay, initial=initial, dynamic_ncols=True,
                    leave=leave)
    return Lines(iterable, desc, total, unit, delay, initial)


class Lines:
    """progress() when stderr is not a terminal: `desc: n/total unit (p%), rate unit/s, elapsed, eta, postfix` as
    whole lines, the first once `delay` seconds have passed, then every INTERVAL seconds, and a last one at the
    end if any was printed."""

    def __init__(self, iterable, desc, total, unit, delay, initial=0):
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.n = self.start_n = initial
        self.t0 = time.perf_counter()
        self.next = self.t0 + delay
        self.postfix, self.printed, self.printed_n = "", False, None

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1):
        self.n += n
        if time.perf_counter() >= self.next:
            self._line()

    def set_postfix(self, **kw):
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def close(self):
        if self.printed and self.next != float("inf") and self.n != self.printed_n:
            self._line()
        self.next = float("inf")  # closed: no more lines

    def _line(self):
        now = time.perf_counter()
        dt = now - self.t0
        rate = (self.n - self.start_n) / dt if dt > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = f", eta {_hms((self.total - self.n) / rate)}" if self.total and rate > 0 and self.n < self.total else ""
        r = f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"
        print(f"{self.desc}: {done} {self.unit}{pct}, {r} {self.unit}/s, {_hms(dt)} elapsed{eta}"
              + (f", {self.postfix}" if self.postfix else ""), file=sys.stderr, flush=True)
        self.printed, self.printed_n, self.next = True, self.n, now + INTERVAL


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@contextlib.contextmanager
def stage(desc: str):
    """One long call that has no loop to count: `desc ...` on stderr once it has run DELAY seconds, then
    `desc: done in S s` when it ends. Also a decorator (`@stage("saving")`)."""
    if _quiet:
        yield
        return
    t0, shown = time.perf_counter(), threading.Event()

    def show():
        print(f"{desc} ...", file=sys.stderr, flush=True)
        shown.set()
    timer = threading.Timer(DELAY, show)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()  # a line being printed now is finished before the last one
        if shown.is_set():
            print(f"{desc}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
