"""train.py --method prefix|prompt|ptuning|llama_adapter|qlora on a tiny model: each learns a fixed batch, its saved
adapter reloads (peft.load_adapter, routed to QLoRA on an NF4 base) with the logits of the trained model, and
generate.py runs with it; QLoRA --merge writes a dequantized HF dir with the adapter model's logits."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model as M
import peft
import train
from tests.tiny import run_inputs

REPO = Path(__file__).resolve().parent.parent
# 4 records = one global batch of 4: every step sees the same batch, so the loss must go down
COMMON = ["--batch-size", "4", "--seq-len", "256", "--schedule", "constant", "--max-grad-norm", "1.0", "--seed", "3",
          "--max-steps", "6"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return run_inputs(tmp_path_factory.mktemp("methods"), 4)


IDS = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 2], [1, 45, 55, 65, 75, 85, 95, 2]])


def run(setup, method, *extra):
    """train.main for one method; returns (out dir, per-step losses, the trained in-memory model, its logits on
    IDS and its number of QLoRA layers, both taken before the final save, which --merge changes in place)."""
    out, kept = setup["dir"] / method, {}
    orig = train.save_final

    def keep(out_, model, *a):
        model.eval()
        with torch.no_grad():
            kept["model"], kept["logits"] = model, model(IDS)                 # (B, T, V): real tokens only
        kept["nf4"] = sum(type(m).__name__ == "QLoraLinear" for m in model.modules())
        return orig(out_, model, *a)
    train.save_final = keep
    try:
        train.main(["--model", setup["model"], "--data", setup["data"], "--out", str(out), "--method", method,
                    *COMMON, *extra])
    finally:
        train.save_final = orig
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return out, [r["loss"] for r in recs if "loss" in r], kept["model"], kept["logits"], kept["nf4"]


@pytest.mark.parametrize("method,extra", [
    ("prefix", ["--num-virtual-tokens", "4", "--lr", "5e-2"]),
    ("prefix", ["--num-virtual-tokens", "4", "--lr", "1e-2", "--prefix-projection", "--encoder-hidden-size", "16"]),
    ("prompt", ["--num-virtual-tokens", "4", "--lr", "5e-2", "--prompt-init", "text", "--prompt-init-text", "nano"]),
    ("ptuning", ["--num-virtual-tokens", "4", "--lr", "1e-2", "--ptuning-encoder", "lstm",
                 "--encoder-hidden-size", "16"]),
    ("llama_adapter", ["--adapter-len", "4", "--adapter-layers", "1", "--lr", "2e-1"]),
])
def test_prompt_methods_learn_reload_and_generate(setup, method, extra):
    out, losses, trained, want, _ = run(setup, method, *extra)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses   # learns the fixed batch
    with torch.no_grad():
        reloaded = peft.load_adapter(M.load_pretrained(setup["model"]), out / "adapter").eval()
        got = reloaded(IDS)
        base = M.load_pretrained(setup["model"])(IDS)
    assert want.shape == base.shape == (2, 8, 128)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got - base).abs().max() > 1e-3                                # the adapter changed the model
    # generate.py with the adapter: the same greedy tokens as the trained in-memory model
    tok = M.load_tokenizer(setup["model"])
    from model.sampling import generate
    text = tok.decode(generate(trained, tok.encode("x"), 5, tok.stop_ids))
    r = subprocess.run([sys.executable, "generate.py", "--adapter", str(out / "adapter"), "--model", setup["model"],
                        "--prompt", "x", "--greedy", "--raw", "--max-new-tokens", "5"], capture_output=True,
                       text=True, cwd=REPO, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == text + "\n"


def test_qlora_learns_reloads_and_merges(setup):
    from quant.checkpoint import load_nf4
    from quant.qlora import QLoraLinear
    out, losses, _, want, n_qlora = run(setup, "qlora", "--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2", "--merge")
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    assert n_qlora == 14                                        # every linear but lm_head was NF4
    with torch.no_grad():
        # peft.load_adapter on an NF4 base routes LoRA to QLoRA
        reloaded = peft.load_adapter(load_nf4(setup["model"], quantize=True), out / "adapter").eval()
        assert sum(isinstance(m, QLoraLinear) for m in reloaded.modules()) == 14
        torch.testing.assert_close(reloaded(IDS), want, rtol=1e-6, atol=1e-6)
        # --merge: dequant(W) + s B A in a plain HF dir (no quantization_config); W x + s B (A x) vs (W + s B A) x
        merged = M.load_pretrained(out / "model")
        assert "quantization_config" not in json.loads((out / "model" / "config.json").read_text())
        torch.testing.assert_close(merged(IDS), want, rtol=1e-5, atol=1e-5)
        assert (merged(IDS) - M.load_pretrained(setup["model"])(IDS)).abs().max() > 1e-3


def test_other_methods_refused_on_an_nf4_base(setup):
    from quant.checkpoint import load_nf4
    with pytest.raises(ValueError, match="^IA3Config: the model has NF4-quantized layers; only LoRA"):
        peft.apply(load_nf4(setup["model"], quantize=True), peft.IA3Config())


@pytest.mark.parametrize("extra,msg", [
    (["--method", "llama_adapter", "--adapter-layers", "9"], "error: LlamaAdapterConfig: adapter_layers=9 exceeds"),
    (["--method", "prompt", "--num-virtual-tokens", "0"], "error: PromptConfig: num_virtual_tokens must be"),
    (["--method", "ptuning", "--ptuning-encoder", "gru"], "error: PTuningConfig: encoder must be mlp | lstm"),
])
def test_bad_method_options_are_one_line_errors(setup, tmp_path, extra, msg):
    with pytest.raises(SystemExit) as e:
        train.main(["--model", setup["model"], "--data", setup["data"], "--out", str(tmp_path / "o"), *extra])
    assert str(e.value.code).startswith(msg) and "\n" not in str(e.value.code)
