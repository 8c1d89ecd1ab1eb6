"""Run HF transformers / PEFT / bitsandbytes reference code in a subprocess outside the repo.

Our `peft/` package shadows HF's `peft` inside the repo, so references never import in-process: each runs as
`python -P` (no script dir on sys.path) in a temporary cwd, with PYTHONPATH cleared. Inputs and outputs travel
as files (safetensors / JSON) in that directory.
"""
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file, save_file

PRELUDE = """
import json, os, sys, torch
from safetensors.torch import load_file, save_file
torch.manual_seed(0)
torch.set_num_threads(2)
"""


def run_reference(code: str, workdir, inputs: dict | None = None, timeout: int = 600) -> dict:
    """Run `code` in a clean subprocess with cwd=workdir. `inputs` (name -> tensor) is saved to in.safetensors
    before; whatever the code saves to out.safetensors is returned (name -> tensor)."""
    workdir = str(workdir)
    os.makedirs(workdir, exist_ok=True)
    if inputs:
        save_file({k: v.contiguous() for k, v in inputs.items()}, os.path.join(workdir, "in.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    script = os.path.join(workdir, "reference.py")
    with open(script, "w") as f:
        f.write(PRELUDE + textwrap.dedent(code))
    r = subprocess.run([sys.executable, "-P", script], cwd=workdir, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"reference script failed:\n{r.stderr[-4000:]}")
    out = os.path.join(workdir, "out.safetensors")
    return load_file(out) if os.path.exists(out) else {}


def tiny_hf_config(model_type: str = "llama", **over) -> dict:
    """A tiny random config.json dict (2 layers, GQA) for each supported architecture."""
    d = {"model_type": model_type, "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
         "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False,
         "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if model_type == "qwen2":
        d.update(use_sliding_window=False)
    if model_type == "qwen3":
        d.update(head_dim=24, attention_bias=False)
    if model_type == "mistral":
        d.update(sliding_window=None)
    d.update(over)
    return d


def make_hf_model(workdir, config: dict, dtype: str = "float32", seed: int = 0) -> str:
    """Create a random HF model from `config` with transformers (no download) and save it to workdir/hf."""
    import json
    out = os.path.join(str(workdir), "hf")
    run_reference(f"""
        from transformers import AutoConfig, AutoModelForCausalLM
        cfg = json.loads({json.dumps(json.dumps(config))})
        config = AutoConfig.for_model(**cfg)
        torch.manual_seed({seed})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so they are tested
            for n, p in model.named_parameters():
                if n.endswith("norm.weight") or n.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
        model.to(getattr(torch, "{dtype}")).save_pretrained("{out}")
    """, workdir)
    return out



def padded_batch(T: int = 12, vocab: int = 128):
    """Token ids (3, T) and a padding mask: row 0 full, row 1 left-padded by 4, row 2 right-padded by 5."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :4] = 0   # left padding
    mask[2, -5:] = 0  # right padding
    return ids, mask


def kv_cache_logits(model, ids, prefill: int = 6) -> torch.Tensor:
    """(B, T, V) logits of KV-cache decoding: a prefill of `prefill` tokens, then one token at a time."""
    from model import KVCache
    with torch.no_grad():
        cache = KVCache(model.cfg.num_hidden_layers)
        steps = [model(ids[:, :prefill], cache=cache)]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], cache=cache))
    return torch.cat(steps, 1)


def kv_cache_error(model, T: int = 10, prefill: int = 6) -> float:
    """Max-abs difference between the logits of KV-cache decoding (a prefill, then one token at a time) and of one
    full forward, on padded_batch's ids."""
    ids, _ = padded_batch(T)
    with torch.no_grad():
        full = model(ids)
    return (kv_cache_logits(model, ids, prefill) - full).abs().max().item()
