"""train.py --zero 1|2|3 [--offload] (dist/) end to end under torchrun with 2 gloo ranks: per-step losses, eval loss
and final weights equal the plain 1-process run with the same global batch; a ZeRO run killed after a checkpoint
resumes with identical losses; bad flag combinations are one-line errors. Tiny random models."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from tests.tiny import chat_records, run_inputs, run_train, write_jsonl

STEPS = 8
COMMON = ["--seq-len", "256", "--lr", "1e-3", "--weight-decay", "0.01", "--warmup", "2", "--schedule", "cosine",
          "--max-grad-norm", "1.0", "--seed", "3", "--max-steps", str(STEPS)]
LORA = ["--method", "lora", "--lora-r", "4", "--lora-alpha", "8"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("zero")
    # tied embeddings: the stage-3 embedding unit must live from the embedding to the chunked loss's lm_head
    return {**run_inputs(d, 48, tie_word_embeddings=True),
            "eval": str(write_jsonl(d / "eval.jsonl", chat_records(6, seed=7)))}


def args(s, out, *extra):
    return ["--model", s["model"], "--data", s["data"], "--out", str(out), *COMMON, *extra]


def records(out) -> list[dict]:
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in records(out) if "loss" in r], dtype=torch.float64)


def weights(out) -> dict:
    f = Path(out) / "model" / "model.safetensors"
    return load_file(str(f if f.exists() else Path(out) / "adapter" / "adapter_model.safetensors"))


def torchrun(argv, patch="", check=True):
    """train.main(argv) on 2 gloo ranks."""
    return run_train(argv, patch, ranks=2, check=check)


def assert_same_run(got, want):
    """Per-step losses (and eval losses) within 1e-6 relative, final trainable weights within 1e-6."""
    torch.testing.assert_close(losses(got), losses(want), rtol=1e-6, atol=0)
    ev = [torch.tensor([r["eval_loss"] for r in records(o) if "eval_loss" in r]) for o in (got, want)]
    torch.testing.assert_close(ev[0], ev[1], rtol=1e-6, atol=0)
    a, b = weights(want), weights(got)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def assert_ledger(out, world):
    """train.py's step-1 memory ledger (dist/ledger.py): each rank's predicted bytes == its measured tensors."""
    recs = json.loads((Path(out) / "memory.json").read_text())
    assert [r["rank"] for r in recs] == list(range(world))
    for r in recs:
        assert r["predicted"] == r["measured"] and r["peak"] > 0, r


def test_zero2_offload_full_two_ranks_equals_one_process(setup):
    """Full fine-tuning: 2 ranks x batch 2 with ZeRO-2 + CPU offload == 1 process x batch 4 (plain AdamW)."""
    d = setup["dir"]
    train.main(args(setup, d / "plain-full", "--method", "full", "--batch-size", "4"))
    torchrun(args(setup, d / "z2", "--method", "full", "--batch-size", "2", "--zero", "2", "--offload"))
    assert len(losses(d / "z2")) == STEPS and losses(d / "z2")[-1] < losses(d / "z2")[0]
    assert_same_run(d / "z2", d / "plain-full")
    assert_ledger(d / "z2", 2)
    assert_ledger(d / "plain-full", 1)  # stage 0: plain data parallel


KILL_AFTER_SAVE = """
orig = train.save_checkpoint
def save(out, step, *a, **k):
    orig(out, step, *a, **k)
    if step == %d:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # rank 0 has renamed the checkpoint into place
        os.kill(os.getpid(), signal.SIGKILL)
train.save_checkpoint = save
"""


def test_zero3_lora_killed_and_resumed_equals_one_process(setup):
    """LoRA with ZeRO-3 (frozen base and LoRA weights sharded per block), eval on every rank: killed
    right after the step-4 checkpoint, resumed to step 8: the 8 losses, the eval losses and the adapter equal
    the uninterrupted plain 1-process run."""
    d = setup["dir"]
    ev = ["--eval-data", setup["eval"], "--eval-every", "4", "--eval-samples", "1", "--save-every", "4"]
    train.main(args(setup, d / "plain-lora", *LORA, *ev, "--batch-size", "4"))
    zero3 = args(setup, d / "z3", *LORA, *ev, "--batch-size", "2", "--zero", "3")
    r = torchrun(zero3, patch=KILL_AFTER_SAVE % 4, check=False)
    assert r.returncode != 0 and train.complete_checkpoints(d / "z3") == [4], r.stderr[-3000:]
    assert sorted(p.name for p in (d / "z3" / "checkpoints" / "step-4").iterdir()) == [
        "manifest.json", "state.pt", "trainer_state.json", "zero.safetensors"]
    torchrun(zero3 + ["--resume"])
    assert train.complete_checkpoints(d / "z3") == [4, 8]
    assert_same_run(d / "z3", d / "plain-lora")
    assert_ledger(d / "z3", 2)  # the resumed segment's first step: the frozen base sharded too
    # a ZeRO checkpoint resumed without --zero: one line, no traceback
    with pytest.raises(SystemExit, match=r"^error: .*step-8: written with --zero; resume it with --zero too$"):
        train.main(args(setup, d / "z3", *LORA, "--batch-size", "4", "--resume"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_zero3_resume_two_four_one_ranks_equals_one_process(setup, method):
    """--zero 3 across world sizes: 2 ranks x batch 2 killed after the step-3 checkpoint, resumed on 4 ranks x
    batch 1 and killed after step 6, resumed in 1 process x batch 4 to step 8 (the same global batch of 4): the
    8 losses and the final adapter / model equal the uninterrupted plain 1-process run (rtol / atol 1e-6)."""
    d, name = setup["dir"], f"z3-241-{method}"
    method_args = LORA if method == "lora" else ["--method", "full"]
    train.main(args(setup, d / f"plain-241-{method}", *method_args, "--batch-size", "4"))
    run = args(setup, d / name, *method_args, "--save-every", "3", "--keep", "3", "--zero", "3")
    for ranks, batch, kill_at, want in ((2, "2", 3, [3]), (4, "1", 6, [3, 6])):
        r = run_train(run + ["--batch-size", batch] + (["--resume"] if ranks == 4 else []),
                      KILL_AFTER_SAVE % kill_at, ranks=ranks, check=False)
        assert r.returncode != 0 and train.complete_checkpoints(d / name) == want, r.stderr[-3000:]
    train.main(run + ["--batch-size", "4", "--resume"])
    assert train.complete_checkpoints(d / name) == [3, 6]
    assert_same_run(d / name, d / f"plain-241-{method}")


@pytest.mark.parametrize("extra,msg", [
    (["--zero", "5"], "error: --zero 5: expected 0 (plain data parallel), 1, 2 or 3"),
    (["--offload"], "error: --offload needs --zero 1, 2 or 3"),
    (["--zero", "2", "--precision", "fp16"], "error: --zero: use --precision bf16 or fp32"),
    (["--zero", "3", "--method", "prompt"], "error: --zero 3 shards the decoder's blocks"),
])
def test_bad_zero_flags_are_one_line_errors(setup, tmp_path, extra, msg):
    with pytest.raises(SystemExit) as e:
        train.main(args(setup, tmp_path / "bad", *extra))
    assert str(e.value.code).startswith(msg) and "\n" not in str(e.value.code)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method,zero", [
    (["--method", "ptuning", "--num-virtual-tokens", "4", "--ptuning-encoder", "lstm", "--lr", "1e-2"], "1"),
    (["--method", "qlora", "--lora-r", "4", "--lora-alpha", "8"], "2"),
    (LORA + ["--merge"], "3"),
], ids=["ptuning-lstm-zero1", "qlora-zero2", "lora-merge-zero3"])
def test_zero_one_process_prompt_wrapper_qlora_merge(setup, method, zero):
    """The ZeRO optimizer over a prompt-method wrapper's encoder (trainable names `encoder.*`), over QLoRA's
    adapters on an NF4 base, and stage 3 LoRA with --merge (merged inside gathered_params), in one process: the
    same losses and adapter / merged model as plain AdamW."""
    d = setup["dir"]
    name = method[1] + zero
    train.main(args(setup, d / f"plain-{name}", *method, "--batch-size", "4"))
    train.main(args(setup, d / f"zero-{name}", *method, "--batch-size", "4", "--zero", zero))
    assert losses(d / f"zero-{name}")[-1] < losses(d / f"zero-{name}")[0]
    assert_same_run(d / f"zero-{name}", d / f"plain-{name}")
    assert_ledger(d / f"zero-{name}", 1)


@pytest.mark.slow
def test_zero3_sharded_load_streamed_save_load_in_transformers_and_peft(setup):
    """--zero 3 on 2 ranks loads the base sharded (every rank reads only its slices, dist/sharded_load.py) and
    saves consolidated: full fine-tuning streams model/ unit by unit (dist/save.py), LoRA writes the adapter.
    Both equal the 1-process run (losses rtol 1e-6, weights 1e-6) and load in transformers / HF PEFT with the
    1-process model's logits (<= 1e-5)."""
    import model as M
    import peft
    from tests.reference import run_reference
    d = setup["dir"]
    for name, method in (("full", ["--method", "full"]), ("lora", LORA)):
        train.main(args(setup, d / f"p3-{name}", *method, "--batch-size", "4"))
        torchrun(args(setup, d / f"z3-{name}", *method, "--batch-size", "2", "--zero", "3"))
        assert_same_run(d / f"z3-{name}", d / f"p3-{name}")
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = M.load_pretrained(d / "p3-full" / "model")(ids)
        lora = peft.load_adapter(M.load_pretrained(setup["model"]), d / "p3-lora" / "adapter")(ids)
    out = run_reference(f"""
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        ids = load_file("in.safetensors")["ids"]
        full = AutoModelForCausalLM.from_pretrained("{d}/z3-full/model", dtype=torch.float32).eval()
        base = AutoModelForCausalLM.from_pretrained("{setup['model']}", dtype=torch.float32).eval()
        lora = PeftModel.from_pretrained(base, "{d}/z3-lora/adapter").eval()
        with torch.no_grad():
            save_file({{"full": full(input_ids=ids).logits, "lora": lora(input_ids=ids).logits}}, "out.safetensors")
    """, d / "ref-z3", {"ids": ids})
    torch.testing.assert_close(out["full"], full, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["lora"], lora, rtol=0, atol=1e-5)
