"""train.py and generate.py on tiny random checkpoints of the architectures beyond LLaMA/Qwen: full fine-tuning,
LoRA (attention + experts by their PEFT names) and QLoRA run, learn, save what transformers' layout expects, and
the result generates. Our own save_pretrained writes the checkpoints (no subprocess)."""
import json

import pytest

import generate
import train
from tests.test_model_archs import CONFIGS
from tests.tiny import chat_records, make_model, write_jsonl

ARCHS = {"gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM", "mixtral": "MixtralForCausalLM",
         "qwen2_moe": "Qwen2MoeForCausalLM"}
RUNS = {"full": [], "lora": ["--lora-r", "4", "--lora-targets", "all-linear"], "qlora": ["--lora-r", "4"]}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_train_and_generate(arch, tmp_path, capsys):
    cfg = {**CONFIGS[arch], "architectures": [ARCHS[arch]], "vocab_size": 128}
    if arch in ("mixtral", "qwen2_moe"):
        cfg["output_router_logits"] = True  # train with the router's aux loss
    m = make_model(tmp_path / "m", seed=1, **cfg)
    data = write_jsonl(tmp_path / "d.jsonl", chat_records(16, seed=2))
    for method, extra in RUNS.items():
        if method == "qlora" and arch != "mixtral":
            continue
        out = tmp_path / method
        train.main(["--model", str(m), "--data", str(data), "--out", str(out), "--method", method, "--batch-size",
                    "4", "--seq-len", "128", "--lr", "1e-2", "--max-steps", "6", "--warmup", "0", *extra])
        losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        assert len(losses) == 6 and losses[-1] < losses[0], (method, losses)
    capsys.readouterr()
    generate.main(["--model", str(tmp_path / "full" / "model"), "--prompt", "alpha", "--max-new-tokens", "4",
                   "--greedy"])
    generate.main(["--model", str(m), "--adapter", str(tmp_path / "lora" / "adapter"), "--prompt", "beta",
                   "--max-new-tokens", "4", "--greedy"])
    assert capsys.readouterr().out.strip()
