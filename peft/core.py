"""Helpers shared by the module-replacement PEFT methods (LoRA, DoRA, IA3, BitFit, bottleneck adapters).

A method swaps chosen linear modules for a wrapper that keeps the base `weight`/`bias` parameter names (so
`<path>.q_proj.weight` stays the base checkpoint key) and lists the parameters it adds or trains in the
module attribute `adapter_names`. Everything else here is built on that one convention:
  adapter_parameters(model)  -> {"model.layers.0.self_attn.q_proj.lora_A.weight": Parameter, ...}
  freeze(model)              -> only those parameters train
  export_state / import_state -> the same tensors under HF PEFT's `base_model.model.` prefix
"""
import contextlib
import json
import re
import typing
from dataclasses import fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import checks

PEFT_PREFIX = "base_model.model."  # HF PEFT's key prefix: PeftModel.base_model (LoraModel).model (the HF model)


def is_linear(m: nn.Module) -> bool:
    # duck-typed so a quantized base linear (NF4) is a target too
    return isinstance(m, nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features")
                                        and not isinstance(m, LinearWrapper))


class LinearWrapper(nn.Module):
    """Base of the wrappers that replace a linear layer: holds the base `weight` (out, in) and `bias` Parameters
    themselves (same objects, same names), so base checkpoint keys are unchanged."""
    adapter_names: tuple = ()

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape[0], weight.shape[1]
        # adapter weights stay fp32 over a bf16/fp16/quantized base (PEFT's autocast_adapter_dtype)
        self.adapter_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32

    @classmethod
    def from_module(cls, module: nn.Module, cfg, **kw):
        return cls(module.weight, module.bias, cfg, **kw)

    def base_forward(self, x):
        """The frozen layer y = W x + b: overridden by QLoRA for an NF4 base."""
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """W as a dense tensor (out, in): overridden by QLoRA to dequantize."""
        return self.weight

    def compute_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W in the dtype a matmul runs in: overridden by QLoRA to dequantize straight to it."""
        return self.weight.to(dtype)


def matches(name: str, targets) -> bool:
    """HF PEFT's rule: a str is a regex over the full module name, a list entry a full name or a name suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets, what: str = "targets") -> list[str]:
    """Names of the linear modules selected by `targets`, with HF PEFT's matching rules:
    a list of names matches a module whose full name equals one or ends with "." + it; a str is a regex that
    must match the full name (re.fullmatch); "all-linear" is every linear except the output head (lm_head, or a classifier's score).
    A listed name that matches nothing is a one-line error listing the names that exist."""
    linears = [n for n, m in model.named_modules() if n and is_linear(m)]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        out = [n for n in linears if n not in ("lm_head", "score")]  # score: a classification head (PEFT SEQ_CLS)
    elif isinstance(targets, str):
        out = [n for n in linears if matches(n, targets)]
        if not out:
            raise ValueError(f"{what}: regex {targets!r} matches no linear module (e.g. {linears[0]})")
    else:
        targets = list(targets)
        available = sorted({n.rsplit(".", 1)[-1] for n in linears})
        for t in targets:
            if not any(matches(n, [t]) for n in linears):
                raise ValueError(f"{what}: no linear module named {t!r} (available: {', '.join(available)})")
        out = [n for n in linears if matches(n, targets)]
    return out


def parse_targets(s: str):
    """A targets string as train.py's flags give it: "" -> None (the method's default), "all-linear" or a regex as
    is, else comma-separated module names -> a list."""
    if not s or s == "all-linear" or ("," not in s and any(c in s for c in "^$.*+?[]()|\\")):
        return s or None
    return s.split(",")


def flag_type(tp):
    """A config field's annotation -> its train.py flag's type; lists of module names parse like "q_proj,v_proj"."""
    args = typing.get_args(tp) or (tp,)
    if any(typing.get_origin(a) is list for a in args):
        return parse_targets
    return next((t for t in (bool, int, float) if t in args), str)


def wrapper_for(module: nn.Module, cfg, cls: type) -> type:
    """The wrapper class that replaces `module`: `cls`, unless the layer computes its weight its own way and says
    which wrapper it takes through a `peft_wrapper(cfg)` method (quant/'s NF4 layers answer QLoRA's wrapper for
    LoRA and refuse other methods). peft/ asks the layer; it never imports the quantization code."""
    return module.peft_wrapper(cfg) if hasattr(module, "peft_wrapper") else cls


def wrap_targets(model: nn.Module, names: list[str], cfg, cls: type, extra=None):
    """Replace each named linear by its wrapper (`cls`, or the layer's own: wrapper_for) built from cfg, then
    freeze everything but the adapter parameters. extra(name) -> more keyword arguments for one layer."""
    for name in names:
        module = model.get_submodule(name)
        new = wrapper_for(module, cfg, cls).from_module(module, cfg, **(extra(name) if extra else {}))
        replace_module(model, name, new)
    freeze(model)
    return model


def replace_module(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter a PEFT method added or trains, by full name: modules declare them in `adapter_names`."""
    out = {}
    for mname, m in model.named_modules():
        for n in getattr(m, "adapter_names", ()):
            out[f"{mname}.{n}" if mname else n] = m.get_parameter(n)
    return out


def freeze(model: nn.Module):
    """requires_grad only on the adapter parameters (the one place where the base is frozen)."""
    trainable = {id(p) for p in adapter_parameters(model).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def export_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors with HF PEFT's keys: `base_model.model.<module path>.<param>`."""
    return {PEFT_PREFIX + k: p.detach().contiguous() for k, p in adapter_parameters(model).items()}


def import_state(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "adapter_model.safetensors"):
    """Copy PEFT-keyed tensors into the adapter parameters; missing/unexpected keys or a shape mismatch are a
    one-line ValueError naming the tensor."""
    params = adapter_parameters(model)
    expected = {PEFT_PREFIX + k for k in params}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {', '.join(missing[:4])}"
                         + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:4])}"
                         + (f" (+{len(unexpected) - 4} more)" if len(unexpected) > 4 else "")
                         + " (adapter saved for another config?)")
    with torch.no_grad():
        for k, p in params.items():
            t = sd[PEFT_PREFIX + k]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{source}: tensor {PEFT_PREFIX + k} has shape {tuple(t.shape)}, the adapter's "
                                 f"config on this base model gives {tuple(p.shape)} (the config doesn't match the "
                                 f"weights, or the adapter is for another base model)")
            p.copy_(t)


def reject_unsupported(d: dict, keys, source: str):
    """One-line error for a PEFT config field we don't implement, when it is set to a non-default value."""
    for k in keys:
        if d.get(k) not in (None, False, {}, [], "none"):
            raise ValueError(f"{source}: {k}={json.dumps(d[k])} is not supported by nanotune")


def build_config(cls, d: dict, source: str, renames: dict | None = None, **extra):
    """A config dataclass from an adapter_config.json dict. PEFT's key names map to our fields through `renames`
    (JSON key -> field); other keys that are field names fill those fields; PEFT's other keys are ignored, and so is
    null (the field's default). Each value is checked against its field's annotation (model.checks) and every int
    field is a size or count (1 .. checks.MAX_SIZE), so a wrong type or size is a one-line error naming the file
    and key. `extra` (fields the caller computed) wins; the dataclass's own checks name the file too."""
    if d.get("peft_type") != cls.peft_type:
        raise ValueError(f"{source}: peft_type {d.get('peft_type')!r} is not {cls.peft_type}")
    renames = renames or {}
    types = {f.name: f.type for f in fields(cls)}
    kw = {}
    for key, value in d.items():
        name = renames.get(key, None if key in renames.values() else key)
        if name not in types or name in extra or value is None:
            continue
        checks.expect(value, types[name], source, key)
        if types[name] in (int, int | None):
            checks.size(value, source, key)
        kw[name] = sorted(value) if name in ("targets", "feedforward") and isinstance(value, list) else value
    try:
        return cls(**kw, **extra)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "cfg", None), "model_type", "llama")


def unload(model: nn.Module, cls: type = LinearWrapper):
    """Replace every `cls` wrapper by a plain nn.Linear holding the same (merged) weight and bias Parameters."""
    for name, m in list(model.named_modules()):
        if isinstance(m, cls):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight, lin.bias = m.weight, m.bias
            replace_module(model, name, lin)


def call_all(model: nn.Module, cls: type, method: str):
    """m.<method>() on every `cls` wrapper (merge / unmerge)."""
    for m in model.modules():
        if isinstance(m, cls):
            getattr(m, method)()


@contextlib.contextmanager
def forwards_replaced(pairs: list):
    """Inside the block, each (module, fn) pair's module runs fn instead of its forward (an instance attribute
    shadows the class's method); afterwards the class's forward is back, whatever happened inside."""
    try:
        for m, fn in pairs:
            m.__dict__["forward"] = fn  # not nn.Module's setattr: a module as fn would become a child
        yield
    finally:
        for m, _ in pairs:
            m.__dict__.pop("forward", None)


def disabled(model: nn.Module):
    """The base model's forward while inside (peft.disabled): every wrapper runs its frozen layer only. The
    default for methods made of LinearWrapper replacements (LoRA, DoRA, IA3, bottleneck adapters, QLoRA)."""
    wrappers = [m for m in model.modules() if isinstance(m, LinearWrapper)]
    if not wrappers:
        raise ValueError(f"{type(getattr(model, 'peft_config', model)).__name__}: no adapter layers to disable")
    if any(getattr(m, "merged", False) for m in wrappers):
        raise ValueError("the adapter is merged into the base weights: unmerge it before disabling it")
    return forwards_replaced([(m, m.base_forward) for m in wrappers])
