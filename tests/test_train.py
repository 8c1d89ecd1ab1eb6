"""train.py: loss parity with HF (full FT and LoRA), grad accumulation, 2 gloo ranks, exact resume after SIGKILL,
crash during a checkpoint save, NaN stop, chunked cross-entropy, eval loss, TOML config. Tiny random models."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import model as M
import train
from tests.reference import run_reference
from tests.tiny import chat_records, run_inputs, run_train, write_jsonl

COMMON = ["--batch-size", "4", "--seq-len", "256", "--lr", "1e-3", "--weight-decay", "0.01", "--warmup", "3",
          "--schedule", "cosine", "--max-grad-norm", "1.0", "--seed", "3"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return run_inputs(tmp_path_factory.mktemp("train"), 48)


def args(s, out, *extra, method="full"):
    return ["--model", s["model"], "--data", s["data"], "--out", str(out), "--method", method, *COMMON, *extra]


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def final_weights(out) -> dict:
    out = Path(out)
    f = out / "model" / "model.safetensors"
    return load_file(str(f if f.exists() else out / "adapter" / "adapter_model.safetensors"))


def run_script(argv, patch="", torchrun=0, check=True):
    """train.main(argv) in a fresh process (optionally with a monkeypatch, or under torchrun)."""
    return run_train(argv, patch, ranks=torchrun, check=check)


# --- loss parity with HF transformers (+ HF PEFT) ----------------------------------------------------------------
def test_loss_parity_with_hf_full_and_lora(setup):
    """20 steps, same tiny model, same batches, same AdamW + cosine warmup schedule + clipping: per-step loss
    equal within 1e-4 relative (fp32). LoRA starts from our initial A/B, loaded by HF PEFT."""
    import peft
    d, steps = setup["dir"], 20
    runs = {"full": [], "lora": ["--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "all-linear"]}
    ours = {}
    for name, extra in runs.items():
        argv = args(setup, d / f"parity-{name}", "--max-steps", str(steps), *extra, method=name)
        train.main(argv)
        ours[name] = losses(d / f"parity-{name}")
    cfg = train.parse_args(argv)
    tok = M.load_tokenizer(cfg.model)
    exs, _, _ = train.data.load_splits(tok, cfg)
    batches, order = {}, train.data.BatchOrder([len(e.ids) for e in exs], cfg.batch_size, cfg.seed)
    for i in range(steps):
        (b,) = order.micro_batches(exs, i, 0, 1, cfg.batch_size, 1, tok.pad_id)
        assert b["position_ids"] is None
        am = b["attention_mask"] if b["attention_mask"] is not None else torch.ones_like(b["input_ids"])
        batches.update({f"{i}.input_ids": b["input_ids"], f"{i}.labels": b["labels"], f"{i}.attention_mask": am})
    torch.manual_seed(cfg.seed)  # what train.main does before build_model: the same LoRA init
    init = train.build_model(cfg, torch.device("cpu"))
    peft.save_adapter(init, d / "lora-init")
    ref = run_reference(f"""
        torch.set_num_threads(1)
        from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup
        from peft import PeftModel
        x = load_file("in.safetensors")
        out = {{}}
        for name in ("full", "lora"):
            model = AutoModelForCausalLM.from_pretrained("{setup['model']}", dtype=torch.float32)
            if name == "lora":
                model = PeftModel.from_pretrained(model, "{d / 'lora-init'}", is_trainable=True)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [{{"params": [p for n, p in named if p.dim() >= 2], "weight_decay": 0.01}},
                      {{"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0}}]
            opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
            sched = get_cosine_schedule_with_warmup(opt, 3, {steps})
            model.train()
            losses = []
            for i in range({steps}):
                loss = model(input_ids=x[f"{{i}}.input_ids"], attention_mask=x[f"{{i}}.attention_mask"],
                             labels=x[f"{{i}}.labels"]).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
                opt.step(); sched.step(); opt.zero_grad()
                losses.append(loss.item())
            out[name] = torch.tensor(losses, dtype=torch.float64)
        save_file(out, "out.safetensors")
    """, d / "ref", batches)
    for name in runs:
        got = torch.tensor(ours[name], dtype=torch.float64)
        assert len(got) == steps and got[-1] < got[0] - 0.05  # it learns
        torch.testing.assert_close(got, ref[name], rtol=1e-4, atol=0)


# --- gradient accumulation and data parallelism ---------------------------------------------------------------
def test_grad_accum_equals_big_batch_uneven_lengths(setup):
    d = setup["dir"]
    train.main(args(setup, d / "acc-1x4", "--max-steps", "6"))
    train.main(args(setup, d / "acc-2x2", "--max-steps", "6", "--batch-size", "2", "--grad-accum", "2"))
    cfg = train.parse_args(args(setup, d / "x", "--max-steps", "6"))
    tok = M.load_tokenizer(cfg.model)
    exs, _, _ = train.data.load_splits(tok, cfg)
    lens = [len(exs[i].ids) for i in train.data.batch_order([len(e.ids) for e in exs], 4, cfg.seed, 0)[0]]
    assert len(set(lens)) > 1  # uneven sequence lengths inside a global batch
    torch.testing.assert_close(torch.tensor(losses(d / "acc-2x2")), torch.tensor(losses(d / "acc-1x4")),
                               rtol=0, atol=1e-6)
    a, b = final_weights(d / "acc-1x4"), final_weights(d / "acc-2x2")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_two_gloo_ranks_equal_one_process(setup):
    d = setup["dir"]
    train.main(args(setup, d / "dp-1", "--max-steps", "5"))
    run_script(args(setup, d / "dp-2", "--max-steps", "5", "--batch-size", "2"), torchrun=2)
    torch.testing.assert_close(torch.tensor(losses(d / "dp-2")), torch.tensor(losses(d / "dp-1")), rtol=0, atol=1e-6)
    a, b = final_weights(d / "dp-1"), final_weights(d / "dp-2")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


# --- checkpoints: exact resume after SIGKILL, a crash during a save ----------------------------------------------
KILL_AFTER_SAVE_5 = """
orig = train.save_checkpoint
def save(out, step, *a, **k):
    orig(out, step, *a, **k)
    if step == 5:
        os.kill(os.getpid(), signal.SIGKILL)
train.save_checkpoint = save
"""
KILL_DURING_SECOND_SAVE = """
orig, calls = train.torch.save, []
def save(*a, **k):  # train.save_checkpoint writes state.pt after trainable.safetensors
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    orig(*a, **k)
train.torch.save = save
"""
LORA = ["--lora-r", "4", "--lora-dropout", "0.1", "--save-every", "5", "--max-steps", "10", "--keep", "3"]


def test_resume_after_sigkill_is_bit_identical(setup):
    """LoRA with dropout, so the RNG state must be restored too."""
    d = setup["dir"]
    run_script(args(setup, d / "res-a", *LORA, method="lora"))
    r = run_script(args(setup, d / "res-b", *LORA, method="lora"), patch=KILL_AFTER_SAVE_5, check=False)
    assert r.returncode == -9 and train.complete_checkpoints(d / "res-b") == [5]
    run_script(args(setup, d / "res-b", *LORA, "--resume", method="lora"))
    assert losses(d / "res-b") == losses(d / "res-a") and len(losses(d / "res-a")) == 10
    a, b = final_weights(d / "res-a"), final_weights(d / "res-b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_during_checkpoint_save_keeps_previous(setup):
    d = setup["dir"]
    if not (d / "res-a" / "adapter").exists():
        run_script(args(setup, d / "res-a", *LORA, method="lora"))
    r = run_script(args(setup, d / "crash", *LORA, method="lora"), patch=KILL_DURING_SECOND_SAVE, check=False)
    assert r.returncode == -9
    ck = d / "crash" / "checkpoints"
    assert train.complete_checkpoints(d / "crash") == [5] and (ck / ".tmp-step-10").is_dir()
    assert sorted(p.name for p in (ck / "step-5").iterdir()) == ["manifest.json", "state.pt",
                                                                 "trainable.safetensors", "trainer_state.json"]
    run_script(args(setup, d / "crash", *LORA, "--resume", method="lora"))
    assert not (ck / ".tmp-step-10").exists() and train.complete_checkpoints(d / "crash") == [5, 10]
    a, b = final_weights(d / "res-a"), final_weights(d / "crash")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_overwrite_a_run_without_resume(setup):
    d = setup["dir"]
    train.main(args(setup, d / "once", "--max-steps", "2", "--save-every", "2"))
    with pytest.raises(SystemExit, match="pass --resume"):
        train.main(args(setup, d / "once", "--max-steps", "2"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(setup, monkeypatch):
    d = setup["dir"]
    orig, calls = train.loss_sum, []

    def poisoned(*a, **k):
        calls.append(1)
        s, logs = orig(*a, **k)
        return (s * float("nan") if len(calls) > 3 else s), logs
    monkeypatch.setattr(train, "loss_sum", poisoned)
    with pytest.raises(SystemExit) as e:
        train.main(args(setup, d / "nan", "--max-steps", "6", "--save-every", "2"))
    msg = str(e.value.code)
    assert "step 4: loss is nan" in msg and str(d / "nan" / "checkpoints" / "step-2") in msg and "\n" not in msg
    assert train.complete_checkpoints(d / "nan") == [2] and not (d / "nan" / "model").exists()


# --- the loss function --------------------------------------------------------------------------------------------
def test_chunked_ce_matches_full_logits():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(50, (37,))
    got = train.ChunkedCE.apply(h, w, y, 8, torch.float32)
    (got * 0.5).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = F.cross_entropy(h @ w.T, y, reduction="sum")
    (want * 0.5).backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)


def test_eval_loss_is_token_weighted_mean(setup):
    d = setup["dir"]
    ev = write_jsonl(d / "eval.jsonl", chat_records(5, seed=9))
    train.main(args(setup, d / "ev", "--max-steps", "2", "--eval-data", str(ev), "--eval-every", "2",
                    "--batch-size", "2"))
    rec = [r for r in map(json.loads, (d / "ev" / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r][-1]
    model = M.load_pretrained(d / "ev" / "model")
    tok = M.load_tokenizer(d / "ev" / "model")
    exs, _ = train.data.load_examples(tok, [ev], 256)
    total, n = 0.0, 0
    for e in exs:  # one example at a time, full logits
        b = train.data.collate([e], tok.pad_id)
        with torch.no_grad():
            lg = model(b["input_ids"])
        total += F.cross_entropy(lg[0, :-1], b["labels"][0, 1:], reduction="sum").item()
        n += train.data.count_targets(b)
    assert abs(rec["eval_loss"] - total / n) < 1e-5 and len(rec["samples"]) == 2
    assert abs(rec["eval_ppl"] - torch.tensor(total / n).exp().item()) < 1e-3


def test_toml_config_sets_keys_and_flags_win(setup, tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('lr = 0.05\nlora-r = 16\nschedule = "linear"\npack = true\n')
    cfg = train.parse_args(["--model", "m", "--data", "d", "--config", str(f), "--lr", "0.01"])
    assert (cfg.lr, cfg.method_args["lora_r"], cfg.schedule, cfg.pack) == (0.01, 16, "linear", True)
    f.write_text("lrr = 1\n")
    with pytest.raises(SystemExit, match="unknown key 'lrr'"):
        train.parse_args(["--model", "m", "--data", "d", "--config", str(f)])


@pytest.mark.parametrize("method,extra", [("dora", ["--lora-r", "4"]), ("ia3", []),
                                          ("bitfit", ["--bitfit-targets", "q_proj,v_proj"]),
                                          ("adapter", ["--adapter-reduction", "4"])])
def test_other_methods_train_and_saved_adapter_reloads(setup, method, extra):
    """Each wired method trains through the same step, and its saved adapter, loaded onto a fresh base, gives the
    eval loss train.py measured on the in-memory model."""
    import peft
    d = setup["dir"]
    ev = write_jsonl(d / "eval-m.jsonl", chat_records(4, seed=5))
    out = d / f"m-{method}"
    train.main(args(setup, out, "--max-steps", "4", "--lr", "1e-2", "--eval-data", str(ev), "--eval-every", "4",
                    "--eval-samples", "0", *extra, method=method))
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    tok = M.load_tokenizer(setup["model"])
    exs, _ = train.data.load_examples(tok, [ev], 256)
    reloaded = peft.load_adapter(M.load_pretrained(setup["model"]), out / "adapter")
    cfg = train.parse_args(args(setup, out))
    got = train.evaluate(reloaded, exs, cfg, torch.device("cpu"), tok.pad_id)
    assert abs(got - recs[-1]["eval_loss"]) < 1e-6
    base = train.evaluate(M.load_pretrained(setup["model"]), exs, cfg, torch.device("cpu"), tok.pad_id)
    assert abs(got - base) > 1e-4  # the adapter changed the model
