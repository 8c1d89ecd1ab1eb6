"""The overview's parameter-share table, measured: every --method at its train.py defaults on four model shapes.

Each model is built on the meta device (names and shapes, no weights, no memory), the method applied exactly as
train.py applies it (peft.method_configs(): the config class with the fields its --method name presets), and the
trainable parameters counted. Share = trainable / base-model parameters (tied embeddings counted once).

    python bench/param_share.py        # prints a markdown table (a few seconds)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peft  # noqa: E402
from model import ModelConfig  # noqa: E402
from model.weights import meta_device, meta_model  # noqa: E402

LLAMA = dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu")
SHAPES = {  # config.json values of each model (sizes only: the weights are never needed)
    "SmolLM2-135M": dict(LLAMA, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "LLaMA-2-7B": dict(LLAMA, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       tie_word_embeddings=False),
    "Qwen2.5-7B": dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6, hidden_act="silu", vocab_size=152064,
                       hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, max_position_embeddings=32768, tie_word_embeddings=False,
                       use_sliding_window=False),
    "Llama-3.1-8B": dict(LLAMA, vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         tie_word_embeddings=False, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
# --method -> (the overview's claimed share, the method's own paper's figure); "—": the source gives none
CLAIMS = {
    "lora": ("0.5-2%", "GPT-3 175B, r=4 on q,v: 4.7M (0.003%)"),
    "dora": ("—", "LLaMA-7B: 0.84% (r=32)"),
    "ia3": ("—", "T0-3B: 0.01%"),
    "bitfit": ("~0.1%", "BERT: 0.08%"),
    "adapter": ("1-5%", "BERT-large: 3.6% per task (Houlsby)"),
    "prefix": ("0.1-1%", "GPT-2: 0.1%"),
    "ptuning_v2": ("0.1-1% (as prefix)", "0.1-3%"),
    "prompt": ("0.01-0.1%", "T5-XXL, 100 tokens: 0.4M (< 0.01%)"),
    "ptuning": ("0.1-1%", "—"),
    "llama_adapter": ("—", "LLaMA-7B: 1.2M (0.02%)"),
    "adalora": ("— (LoRA's 0.5-2%)", "—"),
    "mam": ("—", "BART-large (XSum): 6.7%"),
    "unipelt": ("—", "—"),
}


def count(shape: dict, method: str) -> tuple[int, int]:
    """(trainable, base) parameters of `method` at train.py's defaults on a meta-device model of `shape`."""
    base = meta_model(ModelConfig.from_hf(shape))
    n_base = sum(p.numel() for p in base.parameters())
    cls, preset = peft.method_configs()[method]
    if method == "bitfit" and not any(n.endswith("bias") for n, _ in base.named_parameters()):
        preset = {"targets": "all-linear"}  # a bias-free model: BitFit's default refuses it, new zero biases instead
    with meta_device():
        m = peft.apply(base, cls(**preset))
    return sum(p.numel() for p in m.parameters() if p.requires_grad), n_base


def in_range(share: float, claim: str) -> str:
    """'yes' / 'below' / 'above' against a claim like '0.5-2%' or '~0.1%' (~: within a factor of 2)."""
    c = claim.split(" ")[0].rstrip("%")
    if c in ("—", ""):
        return ""
    lo, hi = (float(c[1:]) / 2, float(c[1:]) * 2) if c.startswith("~") else map(float, c.split("-"))
    return "yes" if lo <= share <= hi else "below" if share < lo else "above"


def main():
    names = list(SHAPES)
    print("| --method | " + " | ".join(f"{n}: trainable (share)" for n in names)
          + " | overview's claim | in range | paper's own figure |")
    print("|---|" + "---|" * (len(names) + 3))
    for method in CLAIMS:
        cells, verdicts = [], set()
        for n in names:
            t, b = count(SHAPES[n], method)
            share = 100 * t / b
            cells.append(f"{t / 1e6:,.2f}M ({share:.3g}%)")
            verdicts.add(in_range(share, CLAIMS[method][0]))
        verdict = "/".join(sorted(v for v in verdicts if v))
        print(f"| `{method}` | " + " | ".join(cells) + f" | {CLAIMS[method][0]} | {verdict} | {CLAIMS[method][1]} |")


if __name__ == "__main__":
    main()
