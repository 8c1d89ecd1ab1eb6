"""4-bit checkpoints in bitsandbytes' HF layout, read and written without bitsandbytes.

A quantized linear `<p>` is stored as `<p>.weight` (packed bytes, possibly viewed as another dtype),
`<p>.weight.absmax`, `<p>.weight.quant_map`, with double quant `<p>.weight.nested_absmax` and
`<p>.weight.nested_quant_map`, and `<p>.weight.quant_state.bitsandbytes__nf4` (JSON bytes holding the logical
shape, blocksize, dtype and nested offset); config.json carries a `quantization_config`. Siblings may sit in
different shards. The same loader also quantizes a full-precision checkpoint on the fly (QLoRA), one tensor at a
time: the model is built on the meta device and each weight is read, quantized and dropped, so peak memory is
the 4-bit model plus one full-precision matrix.
"""
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from model.io import _weight_files, read_config, save_pretrained
from model.model import Transformer
from model.weights import CheckpointError, check_layers, load_state_dict_into, meta_model

from .linear import NF4Linear
from .nf4 import QS_SUFFIX, from_bnb_tensors, quantize_nf4

SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            QS_SUFFIX)


def quantization_config(double_quant: bool, compute_dtype: torch.dtype) -> dict:
    """The `quantization_config` transformers writes for BitsAndBytesConfig(load_in_4bit=True, nf4, ...)."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False}


def _check_quant_config(qc: dict, source: str):
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise CheckpointError(f"{source}: quantization_config is not bitsandbytes 4-bit "
                              f"(quant_method={qc.get('quant_method')!r}, load_in_4bit={qc.get('load_in_4bit')})")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise CheckpointError(f"{source}: bnb_4bit_quant_type {qc.get('bnb_4bit_quant_type', 'fp4')!r} is not "
                              f"supported (only 'nf4')")


def load_nf4(path, dtype=torch.float32, device="cpu", quantize: bool = False, blocksize: int = 64,
             double_quant: bool = True, skip=("lm_head",)) -> Transformer:
    """An HF dir -> Transformer whose linear layers are NF4Linear.

    A bitsandbytes 4-bit dir (config.json has a quantization_config) loads its quantized layers as they are.
    With quantize=True, a full-precision dir is quantized at load time (every nn.Linear except names ending in
    `skip`), streaming one tensor at a time. Other tensors are cast to `dtype`."""
    path = Path(path)
    cfg = read_config(path)
    qc = cfg.hf.pop("quantization_config", None)  # re-added on save only if the model is still quantized
    if qc is not None:
        _check_quant_config(qc, str(path / "config.json"))
    elif not quantize:
        raise CheckpointError(f"{path}: config.json has no quantization_config (pass quantize=True to quantize "
                              f"a full-precision model at load time)")
    where = {}  # key -> the shard holding it (a weight's siblings may sit in different shards)
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt", device="cpu") as h:
            where.update({k: f for k in h.keys()})
    check_layers(cfg.num_hidden_layers, where, path / "config.json")  # from the names, before a build of 1e5 layers
    model = meta_model(cfg)
    consumed = set()

    def take(k):
        # open, copy, close: a tensor from safe_open can be a view of the file's memory map, and a map kept open
        # counts every page read so far (the whole full-precision model by the end) in the process's RSS
        consumed.add(k)
        with safe_open(str(where[k]), framework="pt", device="cpu") as h:
            return h.get_tensor(k).clone()

    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        src = f"{path}: {name}"
        if f"{name}.{QS_SUFFIX}" in where:                          # pre-quantized by bitsandbytes
            tensors = {s: take(f"{name}.{s}") for s in SUFFIXES if f"{name}.{s}" in where}
            try:
                packed, state = from_bnb_tensors(tensors, src)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        elif quantize and not name.endswith(tuple(skip)) and f"{name}.weight" in where:
            w = take(f"{name}.weight").to(device=device, dtype=dtype)  # the one full-precision matrix
            packed, state = quantize_nf4(w, blocksize, double_quant)
            del w
        else:
            continue
        if tuple(state.shape) != tuple(module.weight.shape):
            raise CheckpointError(f"{src}: quantized weight has shape {list(state.shape)}, config.json implies "
                                  f"{list(module.weight.shape)}")
        bias = None
        if module.bias is not None:
            if f"{name}.bias" not in where:
                raise CheckpointError(f"{src}: missing tensor {name}.bias")
            bias = take(f"{name}.bias").to(device=device, dtype=dtype)
        state.dtype = dtype
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, NF4Linear(packed.to(device), state.to(device), bias))
    # the non-quantized tensors: every still-meta parameter must be among them, nothing else may be
    rest = {k: take(k).to(device=device, dtype=dtype) for k in list(where) if k not in consumed}
    load_state_dict_into(model, rest, str(path))
    return model.eval()


def save_nf4(model: Transformer, path, compute_dtype: torch.dtype | None = None):
    """Save a model with NF4Linear layers in bitsandbytes' layout (NF4Linear's state_dict) + quantization_config,
    so `AutoModelForCausalLM.from_pretrained(path)` loads it with bitsandbytes."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    if not layers:
        raise ValueError("save_nf4: the model has no NF4Linear layers (use model.save_pretrained)")
    dq = {m.nested_absmax is not None for m in layers}
    if len(dq) != 1:
        raise ValueError("save_nf4: mixing layers with and without double quant is not representable in config.json")
    qc = quantization_config(dq.pop(), compute_dtype or model.dtype)
    return save_pretrained(model, path, config_updates={"quantization_config": qc})
