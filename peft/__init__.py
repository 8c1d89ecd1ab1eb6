"""nanotune's parameter-efficient fine-tuning: one file per method, HF PEFT's file format where one exists.

    m = peft.apply(model.load_pretrained(base_dir), peft.LoraConfig(r=8, alpha=16, targets="all-linear"))
    print(peft.trainable_summary(m))
    ... train ...
    peft.save_adapter(m, "out/adapter", base_model_path=base_dir)    # HF's PeftModel.from_pretrained reads it
    m = peft.load_adapter(model.load_pretrained(base_dir), "out/adapter")   # ours or PEFT-written
    peft.merge(m)   # fold the update into the base weights (methods that allow it)

Each PEFT method is one module, listed in the method table `MODULES` below, and every lookup is derived from
that tuple (adapter_config.json's peft_type, train.py's --method names and flags). A method module has:
  CONFIGS             its config dataclass(es), each with `peft_type` (adapter_config.json), `methods` (train.py's
                      --method names -> the fields they preset), `flags` (train.py flag -> field),
                      `to_json()` / `from_json(d, source)`
  apply(model, cfg)   freeze the base, add the method's parameters (in place, or return a wrapper)
  export_state(model) / import_state(model, sd, source)   the adapter tensors under PEFT's keys
  merge / unmerge / unload (optional)   fold the update into the base weights, undo, drop the wrappers
  disabled(model) (optional)  a context manager: the base model's forward inside it (the reference model of
                      preference tuning); default core.disabled, for methods made of LinearWrapper layers
  save_extra / load_extra (optional)    files kept beside PEFT's two
  start_run / loss_term / after_step (optional)   train.py's hooks into the run (below), e.g. AdaLoRA's budget
"""
import copy
import json
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from model.atomic import atomic_dir
from model import checks
from model.io import read_safetensors, stored_shapes
from model.model import Transformer
from model.weights import meta_device

from . import core
from . import adalora, adapters, bitfit, ia3, llama_adapter, lora, mam, prefix, prompt, unipelt  # noqa: E501  (MODULES)
from .adalora import AdaLoraConfig
from .mam import MamConfig
from .unipelt import UniPeltConfig
from .adapters import AdapterConfig
from .bitfit import BitFitConfig
from .core import flag_type, parse_targets
from .ia3 import IA3Config
from .llama_adapter import LlamaAdapterConfig
from .lora import LoraConfig
from .prefix import PrefixConfig
from .prompt import PromptConfig, PTuningConfig

__all__ = ["AdaLoraConfig", "AdapterConfig", "BitFitConfig", "IA3Config", "LlamaAdapterConfig", "LoraConfig",
           "MODULES", "MamConfig", "PTuningConfig", "PrefixConfig", "PromptConfig", "UniPeltConfig", "after_step",
           "apply", "check_adapter", "check_table", "config_from_json", "disabled", "flag_type", "load_adapter",
           "loss_term", "merge", "merge_and_unload", "method_config", "method_configs", "method_flags",
           "parse_targets", "read_adapter", "save_adapter", "start_run", "trainable_summary", "type_ok", "unmerge",
           "unwrap"]

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"

# The method table. A new method is a new module in this folder plus its name here (and in the import above).
MODULES = (lora, ia3, bitfit, adapters, prefix, prompt, llama_adapter, adalora, mam, unipelt)


HEAD_NAMES = ("classifier", "score")  # PEFT's SEQ_CLS modules_to_save (the head is `score` in LLaMA-family models)


def head_key(cfg) -> str:
    """The adapter key of a classification head's weight: under PeftModel.base_model (the HF model itself for
    prompt learning, LoraModel & co. holding it as .model otherwise)."""
    prompt_learning = isinstance(cfg, (PrefixConfig, PromptConfig, PTuningConfig))
    return ("base_model." if prompt_learning else core.PEFT_PREFIX) + "score.weight"


def _method(cfg):
    """The module that implements `cfg`'s method."""
    for m in MODULES:
        if isinstance(cfg, m.CONFIGS):
            return m
    raise TypeError(f"not a PEFT config: {type(cfg).__name__}")


def method_configs() -> dict[str, tuple[type, dict]]:
    """train.py's --method names -> (config class, the fields that name presets), e.g. "dora" -> (LoraConfig,
    {"targets": "all-linear", "dora": True})."""
    return {name: (cls, preset) for m in MODULES for cls in m.CONFIGS for name, preset in cls.methods.items()}


def method_flags() -> dict:
    """Every method config's train.py flags, flag name -> argparse type from the field's annotation."""
    out = {}
    for cls, _ in method_configs().values():
        types = {f.name: f.type for f in fields(cls)}
        out.update({flag: flag_type(types[name]) for flag, name in cls.flags.items()})
    return out


def type_ok(value, tp) -> bool:
    """Is a TOML value of the type a train.py field or flag expects? (bool is not a number; an int is a float.)"""
    if tp is parse_targets:
        return isinstance(value, (str, list))
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp) and (tp is bool or not isinstance(value, bool))


def check_table(name: str, table: dict, source: str) -> dict:
    """A method's table of train.py's TOML config ([lora], [dora], ...): its keys are the config dataclass's own
    field names, typed as the fields are. Returns the table; ValueError naming the file, table and key."""
    types = {f.name: f.type for f in fields(method_configs()[name][0])}
    bad = [f for f in table if f not in types]
    if bad:
        raise ValueError(f"{source}: [{name}]: unknown key {bad[0]!r} (keys: {', '.join(sorted(types))})")
    bad = [f for f, x in table.items() if not type_ok(x, flag_type(types[f]))]
    if bad:
        raise ValueError(f"{source}: [{name}]: {bad[0]} = {table[bad[0]]!r}: expected {types[bad[0]]}")
    return table


def method_config(method: str, args: dict, model_path: str = ""):
    """train.py's --method (or qlora / lora8: LoRA over an NF4 / int8 base) -> its config dataclass: the fields the method's name
    presets, then its TOML table ([lora], or that of another name of the same config, e.g. [dora]), then its
    flags (which win, as flags do over TOML). args: train.py's method_args (flags and tables by name)."""
    methods = method_configs()
    cls, kw = methods["lora" if method in ("qlora", "lora8") else method]
    kw = dict(kw)
    for name in [n for n, (c, _) in methods.items() if c is cls] + ["qlora"] * (cls is LoraConfig):
        kw.update(args.get(name, {}))
    kw.update({f: args[flag] for flag, f in cls.flags.items() if flag in args})
    if "base_model_name_or_path" in {f.name for f in fields(cls)}:
        kw.setdefault("base_model_name_or_path", model_path)  # e.g. prompt tuning's text init reads its tokenizer
    return cls(**kw)


def config_from_json(d: dict, source: str = CONFIG_FILE):
    """adapter_config.json dict -> our config dataclass, by its peft_type."""
    by_type = {cls.peft_type: cls for m in MODULES for cls in m.CONFIGS}
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    t = d.get("peft_type")
    if not isinstance(t, str) or t not in by_type:
        raise ValueError(f"{source}: unknown peft_type {t!r} (supported: {', '.join(by_type)})")
    if d.get("task_type") == "SEQ_CLS":  # PEFT lists the classifier head in modules_to_save: the head is ours
        d = {**d, "modules_to_save": [m for m in d.get("modules_to_save") or () if m not in HEAD_NAMES] or None}
    return by_type[t].from_json(d, source)


def read_adapter(path) -> tuple:
    """(config, weights file) of an adapter directory: adapter_config.json read and checked (config_from_json),
    adapter_model.safetensors present. Each problem is a one-line ValueError naming the file."""
    path = Path(path)
    cfile, wfile = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfile.is_file():
        raise ValueError(f"{path}: no {CONFIG_FILE} (not an adapter directory)")
    cfg = config_from_json(checks.read_json(cfile), str(cfile))
    if not wfile.is_file():
        bin_ = " (only adapter_model.bin: pickle files are refused)" if (path / "adapter_model.bin").exists() else ""
        raise ValueError(f"{path}: no {WEIGHTS_FILE}{bin_}")
    return cfg, wfile


def check_adapter(model: nn.Module, cfg, wfile):
    """Whether the adapter `cfg` describes fits the tensors stored in `wfile`, found before anything is allocated:
    the method is applied to a meta-device copy of the base (nothing allocated) and its import_state checks the
    names and shapes of the file's header (no tensor data read). An adapter_config.json with r=10000000 over r=8
    tensors fails here, not after ~60 GB. Sizes the file does not show (P-tuning's encoder width) are bounded by
    this machine's memory instead."""
    method = _method(cfg)
    with meta_device():
        try:
            dry = method.apply(Transformer(unwrap(model).cfg), copy.deepcopy(cfg))
        except ValueError as e:  # settings that don't fit this base (a target it lacks, more layers than it has)
            raise ValueError(f"{wfile.parent / CONFIG_FILE}: {e}") from None
        stored = {k: torch.empty(shape) for k, shape in stored_shapes(wfile).items() if k != head_key(cfg)}
    need = sum(p.numel() * p.element_size() for p in dry.parameters() if p.requires_grad)  # what apply allocates
    method.import_state(dry, stored, str(wfile))  # first: a shape names the tensor (and drops P-tuning's encoder)
    if need > checks.memory_bytes():
        raise ValueError(f"{wfile.parent / CONFIG_FILE}: its settings make {need / 2**30:.1f} GB of adapter "
                         f"parameters, more than this machine's {checks.memory_bytes() / 2**30:.1f} GB of memory")


def unwrap(model: nn.Module) -> nn.Module:
    """The base Transformer under any prompt-method wrapper (those hold it as `.base`)."""
    while hasattr(model, "base") and isinstance(model.base, nn.Module):
        model = model.base
    return model


def apply(model: nn.Module, cfg) -> nn.Module:
    """Freeze the base, add the method's parameters, remember cfg as `model.peft_config`. Returns the model to
    train (the same object for module-replacement methods, a wrapper for prompt methods). A layer that computes
    its weight its own way (quant/'s NF4 layers) is asked first whether it takes this method (core.wrapper_for):
    LoRA on an NF4 model is QLoRA, other methods are refused there."""
    if hasattr(model, "peft_config"):
        raise ValueError(f"model already has a {type(model.peft_config).__name__} applied: one method per model")
    for m in model.modules():
        if hasattr(m, "peft_wrapper"):
            m.peft_wrapper(cfg)  # raises for a method the layer can't take
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
    """Write adapter_config.json (full hyper-parameters + base model path) and adapter_model.safetensors,
    atomically (model/atomic.py): a crash never leaves a half-written adapter."""
    cfg, path = _config(model), Path(path)
    if base_model_path is not None:
        cfg.base_model_name_or_path = str(base_model_path)
    with atomic_dir(path) as tmp:
        d, sd = cfg.to_json(), {k: v.cpu() for k, v in _method(cfg).export_state(model).items()}
        head = getattr(unwrap(model), "score", None)
        if head is not None:  # a classification / reward head (model/classify.py): PEFT's SEQ_CLS modules_to_save
            d.update(task_type="SEQ_CLS", modules_to_save=list(HEAD_NAMES))
            sd[head_key(cfg)] = head.weight.detach().float().cpu().contiguous()
            (tmp / "head.json").write_text(json.dumps({"labels": unwrap(model).labels,
                                                       "pad_token_id": unwrap(model).pad_token_id}) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(d, indent=2) + "\n")
        save_file(sd, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if hasattr(_method(cfg), "save_extra"):  # files beside PEFT's, e.g. the P-tuning encoder (peft/prompt.py)
            _method(cfg).save_extra(model, tmp)
    return path


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Read an adapter directory (ours or HF PEFT's), apply the method to `model`, load the weights. The config
    is checked against the stored tensors before the method allocates anything (check_adapter)."""
    cfg, wfile = read_adapter(path)
    check_adapter(model, cfg, wfile)
    model = apply(model, cfg)
    sd, head = read_safetensors(wfile), getattr(unwrap(model), "score", None)
    if (head_key(cfg) in sd) != (head is not None):
        raise ValueError(f"{wfile}: " + ("holds a classification head (score.weight): load it with python -m "
                                         "model.classify" if head is None else "has no score.weight for the "
                                         "model's classification head"))
    if head is not None:
        with torch.no_grad():
            head.weight.copy_(sd.pop(head_key(cfg)))
    _method(cfg).import_state(model, sd, str(wfile))
    if hasattr(_method(cfg), "load_extra"):
        _method(cfg).load_extra(model, Path(path))
    return model


def disabled(model: nn.Module):
    """Context manager: inside it, `model` computes exactly the base model (the adapter switched off, nothing
    copied), e.g. the reference log-probs of DPO under PEFT. `with peft.disabled(m): ref = m(ids)`"""
    method = _method(_config(model))
    return getattr(method, "disabled", core.disabled)(model)


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


# train.py's three hooks into a run, for methods that act on the training itself (AdaLoRA); no-ops otherwise
def _hook(model, name: str):
    cfg = getattr(model, "peft_config", None)
    return None if cfg is None else getattr(_method(cfg), name, None)


def start_run(model: nn.Module, total_steps: int, zero: int) -> str | None:
    """Once the run's step count is known: the method's check of it (an error message, or None)."""
    hook = _hook(model, "start_run")
    return hook(model, total_steps, zero) if hook else None


def loss_term(model: nn.Module):
    """The method's own term of the loss (a tensor), added once per optimizer step; 0 for most methods."""
    hook = _hook(model, "loss_term")
    return hook(model) if hook else 0


def after_step(model: nn.Module, step: int):
    """After optimizer step `step` (1-based), before the gradients are cleared."""
    hook = _hook(model, "after_step")
    if hook:
        hook(model, step)
