"""What every run leaves beside its weights (dist/report.py): loss.png and report.md, drawn from metrics.jsonl,
after a finished run, a SIGTERM stop and a non-finite stop; redrawn identically by `python -m dist.report`; a resumed
run's curve holding every step once; a method's own metrics in panels of their own. The progress lines (plain on
a non-terminal, none under --quiet). Tiny random models, each run a few steps."""
import json
import math
import os
import signal
import statistics
import struct
import subprocess
import sys

import pytest
import torch

import data
import model as M
import peft
import train
from data import inspect
from dist import report
from model import progress
from tests.tiny import REPO, run_inputs, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = ["--method", "lora", "--lora-r", "4", "--batch-size", "4", "--seq-len", "128", "--lr", "1e-2", "--seed", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return run_inputs(tmp_path_factory.mktemp("report"), 24)


def argv(s, out, *extra):
    return ["--model", s["model"], "--data", s["data"], "--out", str(out), *COMMON, *extra]


def metrics(out):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r], [r for r in recs if "eval_loss" in r]


def png(path, size=(800, 450)) -> bytes:
    """A whole PNG file (signature, header first, end chunk last) of the given pixel size and a plausible length."""
    b = path.read_bytes()
    assert b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR" and b[-8:] == b"IEND\xaeB`\x82", path
    assert struct.unpack(">II", b[16:24]) == size
    assert 10_000 < len(b) < 1_000_000, len(b)
    return b


def rows(text) -> dict[str, str]:
    """The report's two-column table rows: {name: value}."""
    cells = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return {c[0].strip(): c[1].strip() for c in cells if len(c) == 2}


def g(x):
    return f"{x:.4g}"


def test_a_run_leaves_a_plot_and_a_report_whose_figures_are_its_metrics(setup, tmp_path):
    out = tmp_path / "run"
    train.main(argv(setup, out, "--max-steps", "6", "--eval-split", "0.25", "--eval-every", "3", "--eval-samples", "1"))
    before = png(out / "loss.png")
    text = (out / "report.md").read_text()
    steps, evals = metrics(out)
    r = rows(text)
    assert "**finished**, step 6 of 6" in text and "![loss and learning rate](loss.png)" in text
    assert r["steps"] == "6 of 6 (6 logged)"
    low = min(steps, key=lambda x: x["loss"])
    assert r["train loss"].startswith(f"{g(steps[0]['loss'])} at step 1 → {g(steps[-1]['loss'])} at step 6 ")
    assert r["train loss"].endswith(f"lowest {g(low['loss'])} at step {low['step']})")
    assert r["eval loss"] == f"{g(evals[-1]['eval_loss'])} (perplexity {g(evals[-1]['eval_ppl'])}) at step 6"
    assert r["trained tokens"] == f"{sum(s['trained_tokens'] for s in steps):,} (sum over the 6 logged steps)"
    assert r["throughput"].startswith(f"{g(statistics.median(s['tokens_per_s'] for s in steps))} tokens/s ")
    assert r["MFU"].startswith("n/a: no GEMM peak known")  # a CPU: no datasheet peak
    assert [line for line in text.splitlines() if line.startswith("| 3 |") or line.startswith("| 6 |")] == \
        [f"| {e['step']} | {g(e['eval_loss'])} | {g(e['eval_ppl'])} |" for e in evals]
    assert f"> {evals[-1]['samples'][0]}" in text
    # the data summary: what data.load_examples counts, split 18 / 6 by --eval-split 0.25
    _, st = data.load_examples(M.load_tokenizer(setup["model"]), [setup["data"]], 128)
    assert r["training records"] == "24 (0 malformed skipped)" and r["examples"] == "18 train / 6 eval"
    assert r["tokens per epoch"].startswith(f"{st['tokens']:,} ({st['trained_tokens']:,} trained")
    assert r["truncated to --seq-len 128"] == "0" and r["dropped (no trained tokens)"] == "0"
    # redrawing from the files gives the same page and the same picture
    (out / "loss.png").unlink()
    (out / "report.md").unlink()
    report.main([str(out)])
    assert (out / "report.md").read_text() == text and png(out / "loss.png") == before
    # the report's merge command, run as printed, writes a model equal to base + adapter
    merge = text.splitlines()[text.splitlines().index("# merge the adapter into its base: an HF directory "
                                                      "transformers loads") + 1]
    subprocess.run(merge, shell=True, cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ids = torch.tensor([[5, 17, 42, 9, 60]])
    with torch.no_grad():
        want = peft.load_adapter(M.load_pretrained(setup["model"]), out / "adapter")(ids)
        got = M.load_pretrained(out / "merged")(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sigterm_stop_still_writes_both(setup, tmp_path, monkeypatch):
    orig, calls = train.train_step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # while step 2 runs: it finishes, is checkpointed, the run exits
        return orig(*a, **k)
    monkeypatch.setattr(train, "train_step", step)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as e:
            train.main(argv(setup, tmp_path / "term", "--max-steps", "5"))
    finally:  # the stop path exits without restoring train's handlers
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    assert e.value.code == 143
    png(tmp_path / "term" / "loss.png")
    text = (tmp_path / "term" / "report.md").read_text()
    assert "**stopped by signal 15 after step 2 (checkpoint saved)**, step 2 of 5" in text
    assert rows(text)["steps"] == "2 of 5 (2 logged)"


def test_non_finite_stop_writes_both_and_the_resumed_plot_holds_every_step_once(setup, tmp_path, monkeypatch):
    from dist.ddp import AllReduceAdamW
    orig, calls = AllReduceAdamW.clip_grad_norm_, []

    def clip(self, m):
        calls.append(1)
        return orig(self, m) * (float("inf") if len(calls) == 4 else 1.0)
    monkeypatch.setattr(AllReduceAdamW, "clip_grad_norm_", clip)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="step 4: the gradient norm is inf"):
        train.main(argv(setup, out, "--max-steps", "6", "--save-every", "2"))
    png(out / "loss.png")
    text = (out / "report.md").read_text()
    assert "**stopped at step 4: the gradient norm is inf (not finite)**, step 3 of 6" in text
    # resumed from step-2: step 3 is trained again, and logged and drawn once
    monkeypatch.setattr(AllReduceAdamW, "clip_grad_norm_", orig)
    train.main(argv(setup, out, "--max-steps", "6", "--save-every", "2", "--resume"))
    steps, _ = metrics(out)
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    raw = report.plot(out).axes[0].lines[0]  # the raw train-loss curve
    assert list(raw.get_xdata()) == [1, 2, 3, 4, 5, 6] and list(raw.get_ydata()) == [s["loss"] for s in steps]
    text = (out / "report.md").read_text()
    assert rows(text)["steps"] == "6 of 6 (6 logged)" and "**finished**" in text
    assert "| 0 → 3 | stopped at step 4: the gradient norm is inf (not finite) |" in text
    assert "| 2 → 6 | finished |" in text


def test_a_methods_own_metrics_get_panels_and_rows(tmp_path):
    """Preference / classification metrics (classification: not built yet) in metrics.jsonl are drawn and listed without a change
    here; a torn last line (a run killed mid-write) is skipped; config.json and run.json may be missing."""
    recs = [{"step": s, "loss": 2 / s, "lr": 1e-3, "grad_norm": 1.0, "tokens": 10 * s, "trained_tokens": 5,
             "tokens_per_s": 100.0 + s, "rewards/margins": 0.1 * s, "rewards/accuracies": 0.5 + s / 40}
            for s in range(1, 21)]
    recs += [{"step": s, "eval_loss": 1 / s, "eval_ppl": math.exp(1 / s), "eval_accuracy": a}
             for s, a in ((10, 0.7), (20, 0.8))]
    write_jsonl(tmp_path / "metrics.jsonl", recs)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "lo')
    report.main([str(tmp_path)])
    png(tmp_path / "loss.png", size=(800, 1050))  # 4.5 in + 2 in per panel, at 100 dpi
    fig = report.plot(tmp_path)
    assert [a.get_ylabel() for a in fig.axes[1:4]] == ["rewards/margins", "rewards/accuracies", "eval_accuracy"]
    assert list(fig.axes[3].lines[0].get_xdata()) == [10, 20]
    r = rows((tmp_path / "report.md").read_text())
    assert r["rewards/margins"] == "2 at step 20" and r["eval_accuracy"] == "0.8 at step 20"
    assert r["steps"] == "20 of ? (20 logged)" and r["throughput"].startswith("110.5 tokens/s")
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        report.main([str(tmp_path / "nothing")])


def test_progress_is_plain_lines_off_a_terminal_and_nothing_when_quiet(setup, monkeypatch, capsys):
    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    assert not sys.stderr.isatty()  # pytest captures it
    list(progress.progress(range(3), "tokenising", unit="rec", delay=0))
    err = capsys.readouterr().err
    assert "\r" not in err and [line.split(",")[0] for line in err.splitlines()] == \
        ["tokenising: 1/3 rec (33%)", "tokenising: 2/3 rec (67%)", "tokenising: 3/3 rec (100%)"]
    monkeypatch.setattr(progress, "DELAY", 0.0)  # data.inspect on a big file: a line per record read here
    inspect.main(["--model", setup["model"], "--data", setup["data"], "-n", "0"])
    assert "tokenising: 24 rec, " in capsys.readouterr().err
    from tests.test_hostile_inputs import write_gguf  # a tiny llama GGUF, as llama.cpp writes one
    f = write_gguf(setup["dir"] / "tiny.gguf", M.load_pretrained(setup["model"]))
    n = len(M.gguf.gguf_weights(f)[1])
    assert f"converting tiny.gguf: {n}/{n} tensor (100%)" in capsys.readouterr().err
    try:
        inspect.main(["--model", setup["model"], "--data", setup["data"], "-n", "0", "--quiet"])
        list(progress.progress(range(3), "q", delay=0))
        with progress.stage("saving"):
            pass
    finally:
        progress.quiet(False)
    assert capsys.readouterr().err == ""
