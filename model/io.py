"""Load and save HF checkpoint directories (config.json + safetensors, single file or sharded).

The model is built on the meta device and the tensors are attached with `load_state_dict(assign=True)`, so a
7B model is allocated once, in the requested dtype, shard by shard. Pickle files are refused by default:
unpickling runs arbitrary code.
"""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import ModelConfig, Transformer


class CheckpointError(ValueError):
    """A bad checkpoint: the message is one line naming the file and the problem."""


def read_config(path) -> ModelConfig:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json (expected an HF model directory or a .gguf file)")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None
    try:
        return ModelConfig.from_hf(d, source=str(f))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _weight_files(path: Path, allow_bin: bool = False) -> list[Path] | None:
    """The safetensors files to read; None for a pickle-only dir when allow_bin (the caller reads the .bin)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
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


def _read_safetensors(file: Path, dtype, device) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k).to(dtype) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{file}: corrupt safetensors file ({str(e).splitlines()[0]})") from None


def _read_bin(path: Path, dtype) -> dict[str, torch.Tensor]:
    index = path / "pytorch_model.bin.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["pytorch_model.bin"]
    sd = {}
    for n in files:
        sd.update({k: v.to(dtype) for k, v in torch.load(path / n, map_location="cpu", weights_only=True).items()})
    return sd


def load_state_dict_into(model: Transformer, sd: dict, source: str):
    """Check names and shapes against the model, then attach the tensors (no copy) with assign=True."""
    expected = model.state_dict(keep_vars=True)
    if model.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    # HF keeps the (recomputable) rotary inv_freq in some old checkpoints: not a weight
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s): {', '.join(missing[:8])}"
                              + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s): {', '.join(unexpected[:8])}"
                              + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
    for k, p in expected.items():
        if tuple(sd[k].shape) != tuple(p.shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(sd[k].shape)}, "
                                  f"config.json implies {tuple(p.shape)}")
    model.load_state_dict({k: sd[k] for k in expected}, strict=False, assign=True)
    model.tie_weights()


def load_pretrained(path, dtype=torch.float32, device="cpu", allow_bin: bool = False) -> Transformer:
    """An HF model directory (safetensors, single or sharded) or a llama .gguf file -> Transformer (eval mode)."""
    path = Path(path)
    if path.suffix == ".gguf":
        from .gguf import load_gguf
        return load_gguf(path, dtype=dtype, device=device)[0]
    cfg = read_config(path)
    files = _weight_files(path, allow_bin)
    if files is None:
        sd = {k: v.to(device) for k, v in _read_bin(path, dtype).items()}
    else:
        sd = {}
        for f in files:
            sd.update(_read_safetensors(f, dtype, device))
    with torch.device("meta"):
        model = Transformer(cfg)
    load_state_dict_into(model, sd, str(path))
    return model.eval()


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_pretrained(model: Transformer, path, max_shard_bytes: int = 5 * 2**30, config_updates: dict | None = None):
    """Write config.json + model.safetensors (or shards + index above max_shard_bytes) that transformers loads.

    Written into a temporary directory first and renamed into place, so an existing model is never left
    half-overwritten."""
    path = Path(path)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # HF re-ties it from embed_tokens
    cfg = model.cfg.to_hf()
    cfg.update(config_updates or {})
    cfg["torch_dtype"] = cfg["dtype"] = _dtype_name(model.dtype)
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v.cpu(), size + n
    shards.append(cur)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    # keep files that belong beside the weights (tokenizer, generation config) when overwriting in place
    if path.is_dir():
        for f in path.iterdir():
            if f.is_file() and not (tmp / f.name).exists() and not f.name.startswith(("model", "config.json")):
                shutil.copy2(f, tmp / f.name)
        old = path.with_name(path.name + ".old")
        os.rename(path, old)
        os.rename(tmp, path)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.rename(tmp, path)
    return path



if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Convert a pytorch_model.bin directory to safetensors in place.")
    ap.add_argument("--convert-bin", metavar="DIR", required=True)
    a = ap.parse_args()
    m = load_pretrained(a.convert_bin, allow_bin=True)
    save_pretrained(m, a.convert_bin)
    print(f"wrote {a.convert_bin}/model.safetensors")
