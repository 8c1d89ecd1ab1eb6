"""Load and save HF checkpoint directories (config.json + safetensors, single file or sharded); load .gguf files.

The tensors' names and shapes are first read from the safetensors headers and checked against config.json (no
data read, nothing allocated), then the tensors are read shard by shard in the requested dtype and attached to a
meta-device model (weights.load_state_dict_into), so a 7B model is allocated once. A .gguf file is read by the
converter below this module (gguf.gguf_weights) and attached the same way. Pickle files are refused by default:
unpickling runs arbitrary code.
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from . import checks
from .atomic import atomic_dir
from .model import ModelConfig, Transformer
from .weights import (CheckpointError, check_layers, check_shapes, first_line, from_state_dict, load_state_dict_into,
                      meta_model, write_weights)


def read_config(path) -> ModelConfig:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json (expected an HF model directory or a .gguf file)")
    try:
        return ModelConfig.from_hf(checks.read_json(f), source=str(f))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _weight_files(path: Path, allow_bin: bool = False) -> list[Path] | None:
    """The safetensors files to read; None for a pickle-only dir when allow_bin (the caller reads the .bin)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted({str(n) for n in checks.read_json(index)["weight_map"].values()})
        except ValueError as e:  # not JSON
            raise CheckpointError(str(e)) from None
        except (KeyError, TypeError, AttributeError) as e:  # JSON, but no {"weight_map": {name: file}}
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        for n in names:
            if not (path / n).is_file():
                raise CheckpointError(f"{index}: shard {n} is missing from {path}")
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        if allow_bin:
            return None
        raise CheckpointError(
            f"{path}: only pickle weights (pytorch_model.bin), refused by default; convert them once with "
            f"`python -m model.io --convert-bin {path}` (torch.load(weights_only=True) + safetensors)")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _corrupt(file, e: Exception) -> CheckpointError:
    return CheckpointError(f"{file}: corrupt safetensors file ({first_line(e)})")


def stored_shapes(file) -> dict[str, tuple]:
    """name -> shape of every tensor in a safetensors file, from its header alone (no tensor data is read)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and truncated files
        raise _corrupt(file, e) from None


def read_safetensors(file, dtype=None, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (cast to `dtype` unless None); a bad file is a one-line CheckpointError."""
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) if dtype is None else f.get_tensor(k).to(dtype) for k in f.keys()}
    except Exception as e:
        raise _corrupt(file, e) from None


def check_device(device) -> torch.device:
    """`device` as a torch.device, if this machine has it; else a one-line ValueError that says so (not a
    "corrupt file" from whatever first touches it)."""
    try:
        dev = torch.device(device)
        if dev.type == "meta":
            raise ValueError("it holds no data")
        torch.empty(0, device=dev)
    except Exception as e:  # RuntimeError for a bad string or ordinal, AssertionError without CUDA, ...
        raise ValueError(f"device {str(device)!r} is not available here ({first_line(e)})") from None
    return dev


def _read_bin(path: Path, dtype) -> dict[str, torch.Tensor]:
    index = path / "pytorch_model.bin.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["pytorch_model.bin"]
    sd = {}
    for n in files:
        try:
            sd.update({k: v.to(dtype) for k, v in torch.load(path / n, map_location="cpu", weights_only=True).items()})
        except Exception as e:  # a truncated or not-a-checkpoint file: pickle / zip errors from deep inside
            raise CheckpointError(f"{path / n}: corrupt checkpoint ({first_line(e)})") from None
    return sd


def load_pretrained(path, dtype=torch.float32, device="cpu", allow_bin: bool = False) -> Transformer:
    """An HF model directory (safetensors, single or sharded) or a llama .gguf file -> Transformer (eval mode)."""
    path = Path(path)
    check_device(device)
    if path.suffix == ".gguf":
        from .gguf import gguf_weights  # here, not above: `python -m model.gguf` must find it not yet imported
        cfg, sd = gguf_weights(path, dtype=dtype, device=device)
        return from_state_dict(cfg, sd, str(path))
    cfg = read_config(path)
    files = _weight_files(path, allow_bin)
    if files is None:
        return from_state_dict(cfg, {k: v.to(device) for k, v in _read_bin(path, dtype).items()}, str(path))
    # names and shapes from the headers first: a config that doesn't fit the weights fails before any is read
    shapes = {k: v for f in files for k, v in stored_shapes(f).items()}
    check_layers(cfg.num_hidden_layers, shapes, path / "config.json")
    model = meta_model(cfg)
    check_shapes(model, shapes, str(path))
    sd = {k: v for f in files for k, v in read_safetensors(f, dtype, device).items()}
    load_state_dict_into(model, sd, str(path))
    return model.eval()


def save_pretrained(model: Transformer, path, max_shard_bytes: int = 5 * 2**30, config_updates: dict | None = None):
    """Write config.json + model.safetensors (or shards + index above max_shard_bytes) that transformers loads.

    Written through atomic_dir, so an existing model is replaced only once the new one is on disk, never left
    half-overwritten. Files beside the weights in an existing directory (tokenizer, generation config) are kept."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_weights(model, tmp, max_shard_bytes, config_updates)
        if path.is_dir():
            for f in path.iterdir():
                if f.is_file() and not (tmp / f.name).exists() and not f.name.startswith(("model", "config.json")):
                    shutil.copy2(f, tmp / f.name)
    return path


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Convert a pytorch_model.bin directory to safetensors in place.")
    ap.add_argument("--convert-bin", metavar="DIR", required=True)
    a = ap.parse_args()
    m = load_pretrained(a.convert_bin, allow_bin=True)
    save_pretrained(m, a.convert_bin)
    print(f"wrote {a.convert_bin}/model.safetensors")
