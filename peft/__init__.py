"""nanotune's parameter-efficient fine-tuning: one file per method, HF PEFT's file format where one exists.

    m = peft.apply(model.load_pretrained(base_dir), peft.LoraConfig(r=8, alpha=16, targets="all-linear"))
    print(peft.trainable_summary(m))
    ... train ...
    peft.save_adapter(m, "out/adapter", base_model_path=base_dir)    # HF's PeftModel.from_pretrained reads it
    m = peft.load_adapter(model.load_pretrained(base_dir), "out/adapter")   # ours or PEFT-written
    peft.merge(m)   # fold the update into the base weights (methods that allow it)

Each method module has a config dataclass (`to_json()` / `from_json(d)`), `apply(model, cfg)`,
`export_state(model)` / `import_state(model, sd, source)` and, where the method allows, `merge` / `unmerge` /
`unload`. This file dispatches on the config's type with a plain isinstance chain.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import adapters, bitfit, ia3, llama_adapter, lora, prefix, prompt
from .adapters import AdapterConfig
from .bitfit import BitFitConfig
from .ia3 import IA3Config
from .llama_adapter import LlamaAdapterConfig
from .lora import LoraConfig
from .prefix import PrefixConfig
from .prompt import PromptConfig, PTuningConfig

__all__ = ["AdapterConfig", "BitFitConfig", "IA3Config", "LlamaAdapterConfig", "LoraConfig", "PTuningConfig",
           "PrefixConfig", "PromptConfig", "apply", "config_from_json", "load_adapter", "merge", "merge_and_unload",
           "save_adapter", "trainable_summary", "unmerge", "unwrap"]

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _method(cfg):
    """The module that implements `cfg`'s method."""
    if isinstance(cfg, LoraConfig):  # LoRA, rsLoRA and DoRA
        return lora
    if isinstance(cfg, IA3Config):
        return ia3
    if isinstance(cfg, BitFitConfig):
        return bitfit
    if isinstance(cfg, AdapterConfig):
        return adapters
    if isinstance(cfg, (PromptConfig, PTuningConfig)):  # prompt tuning and P-tuning
        return prompt
    if isinstance(cfg, PrefixConfig):
        return prefix
    if isinstance(cfg, LlamaAdapterConfig):
        return llama_adapter
    raise TypeError(f"not a PEFT config: {type(cfg).__name__}")


def config_from_json(d: dict, source: str = CONFIG_FILE):
    """adapter_config.json dict -> our config dataclass, by its peft_type."""
    t = d.get("peft_type")
    if t == "LORA":
        return LoraConfig.from_json(d, source)
    if t == "IA3":
        return IA3Config.from_json(d, source)
    if t == "BITFIT":  # nanotune's own format
        return BitFitConfig.from_json(d, source)
    if t == "BOTTLENECK":  # nanotune's own format
        return AdapterConfig.from_json(d, source)
    if t == "PROMPT_TUNING":
        return PromptConfig.from_json(d, source)
    if t == "P_TUNING":
        return PTuningConfig.from_json(d, source)
    if t == "PREFIX_TUNING":
        return PrefixConfig.from_json(d, source)
    if t == "ADAPTION_PROMPT":  # LLaMA-Adapter
        return LlamaAdapterConfig.from_json(d, source)
    raise ValueError(f"{source}: unknown peft_type {t!r} (supported: LORA, IA3, BITFIT, BOTTLENECK, PROMPT_TUNING, "
                     "P_TUNING, PREFIX_TUNING, ADAPTION_PROMPT)")


def unwrap(model: nn.Module) -> nn.Module:
    """The base Transformer under any prompt-method wrapper (those hold it as `.base`)."""
    while hasattr(model, "base") and isinstance(model.base, nn.Module):
        model = model.base
    return model


def _quantized(model: nn.Module) -> bool:
    """Does `model` have NF4 layers (quant/)? If quant.linear was never imported, it can't."""
    linear = sys.modules.get("quant.linear")
    return linear is not None and any(isinstance(m, linear.NF4Weight) for m in model.modules())


def apply(model: nn.Module, cfg) -> nn.Module:
    """Freeze the base, add the method's parameters, remember cfg as `model.peft_config`. Returns the model to
    train (the same object for module-replacement methods, a wrapper for prompt methods). LoRA on a model with
    NF4 layers is QLoRA (quant/qlora.py: the LoRA wrapper computes its base from the 4-bit weight)."""
    if hasattr(model, "peft_config"):
        raise ValueError(f"model already has a {type(model.peft_config).__name__} applied: one method per model")
    if _quantized(model):
        if not isinstance(cfg, LoraConfig):
            raise ValueError(f"{type(cfg).__name__}: the model has NF4-quantized layers; only LoRA (QLoRA, "
                             "quant/qlora.py) is supported on a quantized base")
        from quant import qlora  # imported here: quant/ imports peft
        model = qlora.apply(model, cfg)
    else:
        model = _method(cfg).apply(model, cfg)
    model.peft_config = cfg
    return model


def trainable_summary(model: nn.Module) -> str:
    """Like PEFT's print_trainable_parameters (shared tensors, e.g. tied embeddings, counted once)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def _config(model):
    cfg = getattr(model, "peft_config", None)
    if cfg is None:
        raise ValueError("model has no PEFT method applied (call peft.apply or peft.load_adapter first)")
    return cfg


def save_adapter(model: nn.Module, path, base_model_path: str | None = None) -> Path:
    """Write adapter_config.json (full hyper-parameters + base model path) and adapter_model.safetensors.
    Written to a temporary directory and renamed into place, so a crash never leaves a half-written adapter."""
    cfg, path = _config(model), Path(path)
    if base_model_path is not None:
        cfg.base_model_name_or_path = str(base_model_path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    sd = {k: v.cpu() for k, v in _method(cfg).export_state(model).items()}
    save_file(sd, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    if hasattr(_method(cfg), "save_extra"):  # files beside PEFT's, e.g. the P-tuning encoder (peft/prompt.py)
        _method(cfg).save_extra(model, tmp)
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    return path


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Read an adapter directory (ours or HF PEFT's), apply the method to `model`, load the weights."""
    path = Path(path)
    cfile, wfile = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfile.is_file():
        raise ValueError(f"{path}: no {CONFIG_FILE} (not an adapter directory)")
    try:
        d = json.loads(cfile.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfile}: invalid JSON ({e})") from None
    cfg = config_from_json(d, str(cfile))
    if not wfile.is_file():
        bin_ = " (only adapter_model.bin: pickle files are refused)" if (path / "adapter_model.bin").exists() else ""
        raise ValueError(f"{path}: no {WEIGHTS_FILE}{bin_}")
    model = apply(model, cfg)
    _method(cfg).import_state(model, load_file(str(wfile)), str(wfile))
    if hasattr(_method(cfg), "load_extra"):
        _method(cfg).load_extra(model, path)
    return model


def _merger(model, what: str):
    m = _method(_config(model))
    if not hasattr(m, what):
        raise ValueError(f"{type(model.peft_config).__name__}: this method can't be merged into the base weights")
    return getattr(m, what)


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights in place (forward unchanged, no extra cost)."""
    _merger(model, "merge")(model)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo merge: the base weights come back (to float rounding) and the adapter is separate again."""
    _merger(model, "unmerge")(model)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then drop the wrappers: a plain Transformer that `model.save_pretrained` writes for transformers."""
    _merger(model, "merge")(model)
    _merger(model, "unload")(model)
    del model.peft_config
    return unwrap(model)
