"""The default run (`make train`): LoRA on SmolLM2-135M-Instruct with data/default/, before/after answers.

    python -m data.default_run [--out runs/default] [--epochs 2] [--model DIR] [-- extra train.py flags]

Answers the held-out questions (data/default/heldout.jsonl) with the base model, fine-tunes with train.py
(LoRA r16 on all linear layers, bf16 autocast where the CPU has it), then answers them again with the adapter.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

import model as M
import peft
import train

HERE = Path(__file__).parent / "default"


def answers(model, tok, questions, device) -> list[str]:
    return [train.generate(model, tok, [{"role": "user", "content": q}], device, max_new=40) for q in questions]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (model.gguf.default_model())")
    ap.add_argument("--out", default="runs/default")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--data", default=str(HERE / "train.jsonl"))
    ap.add_argument("--heldout", default=str(HERE / "heldout.jsonl"))
    ap.add_argument("extra", nargs="*", help="more train.py flags (after --)")
    a = ap.parse_args(argv)
    if a.model is None:
        from model.gguf import default_model
        a.model = str(default_model())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    questions = [json.loads(l)["messages"][0]["content"] for l in Path(a.heldout).read_text().splitlines() if l]
    tok = M.load_tokenizer(a.model)
    base = M.load_pretrained(a.model, device=device)
    before = answers(base, tok, questions, device)
    del base

    t0 = time.time()
    out = train.main(["--model", a.model, "--data", a.data, "--eval-data", a.heldout, "--out", a.out,
                      "--method", "lora", "--lora-r", "16", "--lora-alpha", "32", "--lora-targets", "all-linear",
                      "--epochs", str(a.epochs), "--batch-size", "8", "--seq-len", "256", "--lr", "1e-3",
                      "--warmup", "5", "--schedule", "cosine", "--eval-every", "1000000", "--eval-samples", "0",
                      "--precision", "bf16" if device.type == "cuda" or _has_fast_bf16() else "fp32",
                      *a.extra])
    minutes = (time.time() - t0) / 60

    tuned = peft.load_adapter(M.load_pretrained(a.model, device=device), out / "adapter")
    after = answers(tuned, tok, questions, device)
    lines = [f"# default run: {a.model} + LoRA, {minutes:.1f} min of training", ""]
    for q, b, f in zip(questions, before, after):
        lines += [f"Q: {q}", f"  before: {b}", f"  after:  {f}", ""]
    text = "\n".join(lines)
    (out / "before_after.txt").write_text(text)
    print(text)
    print(f"outputs in {out}/ (adapter/, metrics.jsonl, before_after.txt)")


def _has_fast_bf16() -> bool:
    """bf16 autocast pays off on CPUs with AMX / AVX512-BF16; elsewhere it is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


if __name__ == "__main__":
    sys.exit(main())
