"""BitFit: train only the bias terms (nanotune's own adapter format; HF PEFT has no BitFit).

Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models": freeze every weight, train every bias,   y = W x + b,  only b trainable.
LLaMA-family models have few or no biases (Qwen2: q/k/v only; LLaMA/Mistral: none), so `targets` names linear
layers that get a NEW zero-initialised bias (identity at init): y = W x + b_new, b_new = 0.

Merged export: the biases already live in the model; transformers only loads them when config.json says so.
`merge` therefore completes each bias group the way transformers builds it (LLaMA `attention_bias` = q/k/v/o,
`mlp_bias` = gate/up/down; Qwen3 `attention_bias` = q/k/v/o) with zero biases where none was trained, and sets
the flags; a bias transformers can't hold (e.g. on Qwen2's o_proj) is a one-line error.

File format (same layout as PEFT): adapter_config.json {"peft_type": "BITFIT", "targets": [...] | "all-linear"
| regex | null, "base_model_name_or_path": ...} and adapter_model.safetensors with every trained bias under
`base_model.model.<module path>.bias` (out,), e.g. `base_model.model.model.layers.0.self_attn.q_proj.bias`.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import core
from .core import export_state, import_state  # noqa: F401  (the package's save/load use these)

# model_type -> config.json flag -> the linears whose bias it switches on in transformers
BIAS_FLAGS = {"llama": {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
                        "mlp_bias": ("gate_proj", "up_proj", "down_proj")},
              "qwen3": {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj")},
              "qwen2": {None: ("q_proj", "k_proj", "v_proj")},  # always on in Qwen2
              "mistral": {}}


@dataclass
class BitFitConfig:
    peft_type = "BITFIT"
    methods = {"bitfit": {}}                      # train.py --method name -> preset fields (see LoraConfig)
    flags = {"bitfit_targets": "targets"}         # train.py flag -> field
    targets: list[str] | str | None = None  # linears given a new zero bias if they have none; None: only existing
    base_model_name_or_path: str | None = None

    def to_json(self) -> dict:
        return {"peft_type": self.peft_type, "targets": self.targets,
                "base_model_name_or_path": self.base_model_name_or_path}

    @classmethod
    def from_json(cls, d: dict, source: str = "adapter_config.json") -> "BitFitConfig":
        return core.build_config(cls, d, source)


def _new_bias(lin: nn.Linear, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(torch.zeros(lin.out_features, device=lin.weight.device, dtype=lin.weight.dtype),
                        requires_grad=requires_grad)


CONFIGS = (BitFitConfig,)


def apply(model: nn.Module, cfg: BitFitConfig) -> nn.Module:
    added = set()
    if cfg.targets is not None:
        for name in core.find_targets(model, cfg.targets, "BitFitConfig.targets"):
            lin = model.get_submodule(name)
            if lin.bias is None:
                lin.bias = _new_bias(lin, True)
                added.add(name)
    n = 0
    for name, m in model.named_modules():
        if core.is_linear(m) and getattr(m, "bias", None) is not None:
            m.adapter_names, n = ("bias",), n + 1  # BitFit adds no wrapper: the linear itself lists its bias
            # the bias before training (None: BitFit added it), for peft.disabled; a buffer that is not saved
            m.register_buffer("bias_base", None if name in added else m.bias.detach().clone(), persistent=False)
    if n == 0:
        raise ValueError("BitFitConfig: the model has no biases to train; name linears in targets "
                         "(e.g. 'all-linear') to give them zero-initialised biases")
    core.freeze(model)
    return model


def disabled(model: nn.Module):
    """peft.disabled: each trained bias back at its value before training (none where BitFit added one)."""
    return core.forwards_replaced([(m, functools.partial(F.linear, weight=m.weight, bias=m.bias_base))
                                   for m in model.modules() if "bias_base" in m._buffers])


def merge(model: nn.Module):
    """Make the model's biases loadable by transformers: fill each needed bias group with zero biases, set the
    config.json flags. The numbers do not change."""
    mt = core.model_type(model)
    flags = BIAS_FLAGS.get(mt, {})
    needed = set()
    for name, m in model.named_modules():
        if "bias" in getattr(m, "adapter_names", ()):
            leaf = name.rsplit(".", 1)[-1]
            flag = [f for f, leaves in flags.items() if leaf in leaves]
            if not flag:
                raise ValueError(f"BitFit: transformers' {mt} has no bias on {leaf} ({name}.bias): can't write a "
                                 f"merged checkpoint, save the adapter instead")
            needed.add(flag[0])
    needed.discard(None)
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if any(leaf in flags[f] for f in needed) and m.bias is None:
            m.bias, m.bitfit_filled = _new_bias(m, False), True
    cfg = model.cfg
    model.bitfit_old_flags = (cfg.attention_bias, cfg.o_bias, cfg.mlp_bias, dict(cfg.hf))
    if "attention_bias" in needed:
        cfg.attention_bias = cfg.o_bias = True
    if "mlp_bias" in needed:
        cfg.mlp_bias = True
    if cfg.hf:
        cfg.hf.update({f: True for f in needed})


def unmerge(model: nn.Module):
    """Drop the zero biases that merge added and restore the config flags."""
    for m in model.modules():
        if getattr(m, "bitfit_filled", False):
            m.bias = None
            del m.bitfit_filled
    if hasattr(model, "bitfit_old_flags"):
        cfg = model.cfg
        cfg.attention_bias, cfg.o_bias, cfg.mlp_bias, cfg.hf = model.bitfit_old_flags
        del model.bitfit_old_flags


def unload(model: nn.Module):
    """After merge: the biases become plain base parameters."""
    for m in model.modules():
        if hasattr(m, "adapter_names") and isinstance(m, nn.Linear):
            del m.adapter_names
        if hasattr(m, "bitfit_filled"):
            del m.bitfit_filled
    model.__dict__.pop("bitfit_old_flags", None)
