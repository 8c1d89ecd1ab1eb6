"""QLoRA: LoRA adapters on a frozen NF4 (+ double quant) base.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", eq. 5:
    Y = X · doubleDequant(c1, c2, W_nf4)^T + s · X L1 L2       (L1 L2 = our A^T B^T, s = alpha / r)
Only the adapters train; the base weight is dequantized on the fly in forward and again in backward (for the
input gradient), so the frozen model costs ~0.52 bytes/param. Adapters stay fp32 (PEFT's default over a
quantized base). Usage:

    model = load_qlora("path/to/hf_dir", LoraConfig(r=16, alpha=32, targets="all-linear"))
    ... train model.parameters() that require grad ...
    peft.save_adapter(model, "adapter/")               # HF PEFT format, base = the original model
    dense = merge_dequantized(model, torch.bfloat16)   # plain Transformer: W = dequant(W_nf4) + s B A

Merging is into the DEQUANTIZED base: adding s·B·A to 4-bit codes would round most of the delta away.
"""
import torch
import torch.nn as nn

import peft
from model.io import read_safetensors
from model.model import Transformer
from peft import lora
from peft.lora import LoraConfig

from .checkpoint import load_nf4
from .linear import NF4Weight, QLoraLinear  # noqa: F401  (QLoraLinear: quant.qlora's public name)


def apply(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """LoRA on the NF4 linears (QLoraLinear; plain LoraLinear on any unquantized target), the rest frozen: the
    same as peft.apply, whose LoRA asks each NF4 layer for its wrapper (NF4Linear.peft_wrapper)."""
    return peft.apply(model, cfg)


def load_qlora(path, cfg: LoraConfig, dtype=torch.float32, device="cpu", blocksize: int = 64,
               double_quant: bool = True) -> Transformer:
    """Load an HF dir with its linear layers (except lm_head) quantized to NF4 at load time, streaming one
    tensor at a time (or as stored, for a bitsandbytes 4-bit dir), then put LoRA on top. `dtype` is the dtype of
    the unquantized tensors (embeddings, norms, lm_head) and of the dequantized weights' default."""
    model = load_nf4(path, dtype=dtype, device=device, quantize=True, blocksize=blocksize, double_quant=double_quant)
    return apply(model, cfg)


def load_adapter(model: nn.Module, path) -> nn.Module:
    """peft.load_adapter for a model with NF4Linear layers: an HF PEFT LoRA dir (adapter_config.json +
    adapter_model.safetensors, e.g. written by peft.save_adapter from a QLoRA run) applied as QLoRA."""
    cfg, wfile = peft.read_adapter(path)
    if not isinstance(cfg, LoraConfig):
        raise ValueError(f"{wfile.parent / peft.CONFIG_FILE}: QLoRA needs a LORA adapter, got {type(cfg).__name__}")
    peft.check_adapter(model, cfg, wfile)  # the config against the stored shapes, before apply allocates
    model = apply(model, cfg)
    lora.import_state(model, read_safetensors(wfile), str(wfile))
    return model


def merge_dequantized(model: nn.Module, dtype=torch.float32, kinds=(NF4Weight,)) -> nn.Module:
    """Replace every QLoraLinear by nn.Linear(dequant(W) + s B A) and every NF4Linear by nn.Linear(dequant(W)),
    in `dtype`, in place: the result is a plain model that model.save_pretrained writes as a normal HF dir.
    `kinds`: the quantized layer classes (quant/int8.py passes its own; DoRA there: m (W + s B A) / ||W + s B A||)."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, kinds):
            continue
        with torch.no_grad():
            w = m.dequantize(torch.float32)                     # (out, in), merged in fp32 then cast once
            if isinstance(m, lora.LoraLinear):
                w = w + m.delta_weight().float()
            if isinstance(m, lora.DoraLinear):
                w = (m.lora_magnitude_vector.float() / torch.linalg.norm(w, dim=1)).view(-1, 1) * w
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=dtype)
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        lin.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    if hasattr(model, "peft_config"):
        del model.peft_config
    if hasattr(model, "cfg"):
        model.cfg.hf.pop("quantization_config", None)
    return model
