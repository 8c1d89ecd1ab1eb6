"""Safety and recovery of train.py runs: what --out may be, the run lock, flags and TOML values checked up front,
--resume checking its settings and falling back past a damaged checkpoint, the non-finite guard, SIGTERM, a full
disk. Tiny random models; each class of failure once (table-driven where the shape repeats)."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from tests.tiny import run_inputs, run_train

pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = ["--method", "lora", "--lora-r", "4", "--lora-dropout", "0.1", "--batch-size", "4", "--seq-len", "128",
          "--lr", "1e-3", "--warmup", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return run_inputs(tmp_path_factory.mktemp("safety"), 24)


def argv(s, out, *extra):
    return ["--model", s["model"], "--data", s["data"], "--out", str(out), *COMMON, *extra]


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def snapshot(d: Path) -> dict:
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def one_line_exit(args, match: str):
    with pytest.raises(SystemExit) as e:
        train.main(args)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and match in msg and "\n" not in msg, msg
    return msg


# --- what --out may be -----------------------------------------------------------------------------------------
def test_out_that_is_not_ours_is_refused_and_left_byte_identical(setup, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "adapter").mkdir()
    (mine / "adapter" / "x.bin").write_bytes(b"\x00\x01")
    (tmp_path / "afile").write_text("a file")
    model = Path(setup["model"])
    before = {d: snapshot(d) for d in (mine, model)}
    one_line_exit(argv(setup, mine), "holds files nanotune did not write (adapter, notes.txt)")
    one_line_exit(argv(setup, model), "inside the model's own directory")
    one_line_exit(argv(setup, model / "run"), "inside the model's own directory")
    one_line_exit(argv(setup, tmp_path / "afile"), "is a file")
    monkeypatch.chdir(tmp_path)
    one_line_exit(argv(setup, ""), "not the current directory")
    one_line_exit(argv(setup, tmp_path), "that is the current directory")
    assert {d: snapshot(d) for d in (mine, model)} == before and (tmp_path / "afile").read_text() == "a file"
    assert not (model / "run").exists()
    # an empty directory of the user's is fine, and becomes a run directory (the marker), which a rerun may reuse
    empty = tmp_path / "empty"
    empty.mkdir()
    train.main(argv(setup, empty, "--max-steps", "1"))
    assert (empty / ".nanotune-run").is_file() and (empty / "adapter").is_dir()
    train.main(argv(setup, empty, "--max-steps", "1"))


def test_second_run_into_the_same_out_is_refused_while_the_first_finishes(setup, tmp_path):
    out = tmp_path / "busy"
    slow = "orig = train.train_step\ndef step(*a, **k):\n    time.sleep(0.5)\n    return orig(*a, **k)\n" \
           "train.train_step = step"
    first = subprocess.Popen(["python", "-c", "import sys; sys.path.insert(0, '.'); import tests.tiny as t; "
                              f"r = t.run_train({argv(setup, out, '--max-steps', '12')!r}, {slow!r}, check=False); "
                              "print(r.returncode); sys.stderr.write(r.stderr[-2000:])"],
                             cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    marker = out / ".nanotune-run"
    for _ in range(600):  # until the first run holds the lock (its pid is in the marker)
        if marker.is_file() and marker.read_text().strip():
            break
        time.sleep(0.1)
    pid = marker.read_text().strip()
    msg = one_line_exit(argv(setup, out, "--max-steps", "1"), f"another run (pid {pid}) is using it")
    assert "wait for it or give another --out" in msg
    stdout, stderr = first.communicate(timeout=300)
    assert stdout.strip() == "0", stderr
    assert len(losses(out)) == 12 and (out / "adapter" / "adapter_model.safetensors").is_file()


# --- flags and TOML values, before anything is loaded ----------------------------------------------------------
@pytest.mark.parametrize("extra,match", [
    (["--seq-len", "-5"], "--seq-len -5: expected a number > 0"),
    (["--max-steps", "-1"], "--max-steps -1: expected a number >= 0"),
    (["--batch-size", "0"], "--batch-size 0: expected a number > 0"),
    (["--grad-accum", "0"], "--grad-accum 0"),
    (["--log-every", "0"], "--log-every 0"),
    (["--lr", "nan"], "--lr nan"),
    (["--epochs", "nan"], "--epochs nan"),
    (["--warmup", "-5"], "--warmup -5"),
    (["--eval-split", "-0.5"], "--eval-split -0.5: expected a number in [0, 1)"),
    (["--adam-eps", "0"], "--adam-eps 0.0: expected a number > 0"),
    (["--adam-beta2", "1"], "--adam-beta2 1.0"),
    (["--max-steps", "0", "--epochs", "0"], "nothing to train"),
])
def test_bad_flag_values_are_one_line_errors(setup, tmp_path, extra, match):
    one_line_exit(argv(setup, tmp_path / "o", *extra), match)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("toml,match", [
    ('pack = "false"', "pack = 'false': expected bool"),
    ('lr = "1e-3"', "lr = '1e-3': expected float"),
    ("batch-size = 2.5", "batch_size = 2.5: expected int"),
    ("lora-r = true", "lora_r = True: expected int"),
    ('[lora]\nalpha = "16"', "[lora]: alpha = '16': expected <class 'float'>"),
    ("[lora]\nrank = 3", "[lora]: unknown key 'rank'"),
    ("lr = ", "run.toml: "),  # invalid TOML
])
def test_bad_toml_values_are_one_line_errors(setup, tmp_path, toml, match):
    f = tmp_path / "run.toml"
    f.write_text(toml + "\n")
    one_line_exit(argv(setup, tmp_path / "o", "--config", str(f)), match)
    one_line_exit(argv(setup, tmp_path / "o", "--config", str(tmp_path / "missing.toml")), "missing.toml")
    assert not (tmp_path / "o").exists()


# --- resume ----------------------------------------------------------------------------------------------------
KILL_AFTER_SAVE = """
orig = train.save_checkpoint
def save(out, step, *a, **k):
    orig(out, step, *a, **k)
    if step == %d:
        os.kill(os.getpid(), signal.SIGKILL)
train.save_checkpoint = save
"""


@pytest.fixture(scope="module")
def whole(setup):
    """The uninterrupted 10-step run every resumed one must reproduce."""
    out = setup["dir"] / "whole"
    run_train(argv(setup, out, "--max-steps", "10", "--save-every", "5"))
    return out


def test_resume_refuses_changed_settings_unless_overridden(setup, whole):
    out = setup["dir"] / "changed"
    r = run_train(argv(setup, out, "--max-steps", "10", "--save-every", "5"), KILL_AFTER_SAVE % 5, check=False)
    assert r.returncode == -9
    msg = one_line_exit(argv(setup, out, "--max-steps", "10", "--resume", "--lr", "2e-3", "--seed", "4"),
                        "was trained with other settings: lr: 0.001 -> 0.002; seed: 3 -> 4")
    assert "--resume-override lr,seed" in msg
    cfg_before = (out / "config.json").read_text()
    assert json.loads(cfg_before)["lr"] == 1e-3  # the refused run wrote nothing
    # --max-steps may change (extend the run); --resume-override lr continues with the new lr from step 5
    train.main(argv(setup, out, "--max-steps", "12", "--resume", "--lr", "2e-3", "--resume-override", "lr"))
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in recs}
    base = {r["step"]: r["lr"] for r in map(json.loads, (whole / "metrics.jsonl").read_text().splitlines())}
    assert [lr[s] for s in range(1, 6)] == [base[s] for s in range(1, 6)] and sorted(lr) == list(range(1, 13))
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3)
    sched = train.make_scheduler(sgd, train.parse_args(argv(setup, out, "--max-steps", "12", "--lr", "2e-3")), 12)
    want = []
    for _ in range(12):  # the schedule a fresh 12-step run with lr 2e-3 follows
        want.append(sched.get_last_lr()[0])
        sgd.step()
        sched.step()
    assert lr[6] == pytest.approx(want[5], rel=1e-12) and lr[12] == pytest.approx(want[11], rel=1e-12)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(setup, whole):
    out = setup["dir"] / "damaged"
    r = run_train(argv(setup, out, "--max-steps", "10", "--save-every", "5", "--keep", "3"), KILL_AFTER_SAVE % 10,
                  check=False)
    assert r.returncode == -9
    f = out / "checkpoints" / "step-10" / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # truncated
    (out / "checkpoints" / "step-x1").mkdir()  # a stray directory is not a checkpoint
    r = run_train(argv(setup, out, "--max-steps", "10", "--save-every", "5", "--resume"))
    assert f"warning: {f}: missing or changed since it was written" in r.stderr
    assert "resumed from " + str(out / "checkpoints" / "step-5") in r.stdout
    assert losses(out) == losses(whole)
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (whole, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- the non-finite guard --------------------------------------------------------------------------------------
def test_non_finite_weights_stop_the_run_and_nothing_non_finite_is_saved(setup, tmp_path, monkeypatch):
    from dist.ddp import AllReduceAdamW
    orig, calls = AllReduceAdamW.step, []

    def poisoned(self):
        out = orig(self)
        calls.append(1)
        if len(calls) == 4:  # the 4th update writes a nan into one weight (as adam_eps 0 or a nan alpha would)
            with torch.no_grad():
                self.params[0].view(-1)[0] = float("nan")
        return out
    monkeypatch.setattr(AllReduceAdamW, "step", poisoned)
    out = tmp_path / "nan"
    msg = one_line_exit(argv(setup, out, "--max-steps", "6", "--save-every", "1"),
                        "step 4: the update made weights non-finite (nan/inf); stopped without saving this step")
    assert str(out / "checkpoints" / "step-3") in msg
    assert train.complete_checkpoints(out) == [2, 3] and not (out / "adapter").exists()
    for d in (out / "checkpoints").iterdir():
        assert all(torch.isfinite(t).all() for t in load_file(str(d / "trainable.safetensors")).values())


def test_non_finite_gradient_norm_stops_before_the_update(setup, tmp_path, monkeypatch):
    from dist.ddp import AllReduceAdamW
    orig = AllReduceAdamW.clip_grad_norm_
    monkeypatch.setattr(AllReduceAdamW, "clip_grad_norm_", lambda self, m: orig(self, m) * float("inf"))
    one_line_exit(argv(setup, tmp_path / "inf", "--max-steps", "3"),
                  "step 1: the gradient norm is inf (not finite); stopped without saving this step")


# --- SIGTERM (preemption) --------------------------------------------------------------------------------------
SIGTERM_AT_3 = """
orig, calls = train.train_step, []
def step(*a, **k):
    out = orig(*a, **k)
    calls.append(1)
    if len(calls) == 3 and int(os.environ.get("RANK", "0")) == 0:
        os.kill(os.getpid(), signal.SIGTERM)  # while step 3 runs: it finishes, is checkpointed, the run exits
    return out
train.train_step = step
"""


@pytest.mark.parametrize("ranks", [0, 2], ids=["1-process", "2-gloo-ranks"])
def test_sigterm_checkpoints_and_resume_is_identical(setup, whole, ranks):
    out = setup["dir"] / f"term-{ranks}"
    a = argv(setup, out, "--max-steps", "10", "--save-every", "5")
    if ranks:  # the same global batch of 4 as `whole`: 2 ranks x 2
        a[a.index("--batch-size") + 1] = "2"
    r = run_train(a, SIGTERM_AT_3, ranks=ranks, check=False)
    assert r.returncode != 0 and (ranks or r.returncode == 143), r.stderr[-2000:]
    assert f"stopped by signal 15 after step 3: checkpoint {out / 'checkpoints' / 'step-3'} saved" in r.stderr
    assert train.complete_checkpoints(out) == [3] and not (out / "adapter").exists()
    run_train(a + ["--resume"], ranks=ranks)
    ref = whole
    if ranks:  # each rank draws its own dropout masks: the reference is the same 2-rank run, uninterrupted
        ref = setup["dir"] / "term-ref"
        run_train([x if x != str(out) else str(ref) for x in a], ranks=ranks)
    assert losses(out) == losses(ref) and len(losses(out)) == 10


# --- a full disk -----------------------------------------------------------------------------------------------
def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(setup, whole, tmp_path):
    from dist.run import verify_manifest
    size = sum(f.stat().st_size for f in (whole / "checkpoints" / "step-5").iterdir())  # one checkpoint
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.6) + 65536}",
                                            "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = mnt / "run"
        r = run_train(argv(setup, out, "--max-steps", "4", "--save-every", "1", "--keep", "3"), check=False)
        line = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and line.startswith(f"error: no space left on the device of {out / 'checkpoints'}")
        assert "the previous checkpoints are kept" in line and "Traceback" not in r.stderr
        kept = train.complete_checkpoints(out)
        assert kept and not list((out / "checkpoints").glob(".tmp-*"))
        verify_manifest(out / "checkpoints" / f"step-{kept[-1]}")  # intact
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# --- hostile data and chat templates -----------------------------------------------------------------------------
@pytest.mark.parametrize("line,match", [
    ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON too deeply nested or a number too long"),
    ('{"text": "a", "n": ' + "9" * 5000 + "}", "JSON too deeply nested or a number too long (ValueError)"),
], ids=["nested-100k", "5000-digits"])
def test_hostile_json_is_a_file_line_error(setup, tmp_path, line, match):
    f = tmp_path / "h.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n")
    one_line_exit(argv(setup, tmp_path / "o", "--data", str(f)), f"{f}:2: {match}")


@pytest.mark.parametrize("template,match", [
    ("{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
     "the chat template ran for more than 0.5 s"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "the chat template's output exceeds"),
], ids=["slow", "huge-output"])
def test_hostile_chat_template_is_bounded(setup, tmp_path, monkeypatch, template, match):
    import model.tokenizer as T
    monkeypatch.setattr(T, "TEMPLATE_SECONDS", 0.5)
    t0 = time.perf_counter()
    one_line_exit(argv(setup, tmp_path / "o", "--template", template), match)
    assert time.perf_counter() - t0 < 10


def test_seq_len_past_the_model_context_warns(setup, tmp_path, capsys):
    train.main(argv(setup, tmp_path / "o", "--seq-len", "1024", "--max-steps", "1"))  # the tiny model has 512
    assert "warning: --seq-len 1024 exceeds the model's context (512 positions)" in capsys.readouterr().err


def test_ranks_with_different_data_stop_on_every_rank(setup, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(Path(setup["data"]).read_text().replace("alpha", "omega"))
    swap = ("orig = train.main\n"
            "def main(a):\n"
            "    if os.environ['RANK'] == '1':\n"
            f"        a = [{str(other)!r} if x == {setup['data']!r} else x for x in a]\n"
            "    return orig(a)\n"
            "train.main = main")
    out = tmp_path / "ranks"
    r = run_train(argv(setup, out, "--max-steps", "2", "--batch-size", "2"), swap, ranks=2, check=False)
    assert r.returncode != 0
    assert "error: rank 1 has other settings than rank 0: data: " in r.stderr and str(other) in r.stderr
    assert not (out / "adapter").exists() and not (out / "config.json").exists()


def test_another_methods_options_are_a_warning(setup, tmp_path, capsys):
    f = tmp_path / "run.toml"
    f.write_text("[prefix]\nnum_virtual_tokens = 4\n")
    train.parse_args(argv(setup, tmp_path / "o", "--method", "ia3", "--lora-r", "4", "--config", str(f)))
    err = capsys.readouterr().err
    assert "warning: --lora-r is not an option of --method ia3: ignored" in err
    assert "warning: [prefix] is not an option of --method ia3: ignored" in err
    train.parse_args(argv(setup, tmp_path / "o", "--lora-r", "4"))  # COMMON's --method lora: no warning
    assert "warning" not in capsys.readouterr().err
