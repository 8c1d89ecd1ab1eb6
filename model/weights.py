"""A state dict <-> a Transformer, whatever file it came from or goes to: the checks and the attach on load, the
config.json + safetensors files on save, and CheckpointError, the one error type of a bad checkpoint.

It sits below the formats: io.py (HF directories) and gguf.py (llama.cpp files) both read tensors into a state
dict and hand it here, so the GGUF converter needs nothing from the HF loader and the loader calls the converter
from above. On load the model is built on the meta device and the tensors are attached with
`load_state_dict(assign=True)`: nothing is allocated twice and nothing is copied.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .model import ModelConfig, Transformer


class CheckpointError(ValueError):
    """A bad checkpoint: the message is one line naming the file and the problem."""


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")


def load_state_dict_into(model: Transformer, sd: dict, source: str):
    """Check `sd`'s names and shapes against the model's still-meta tensors, then attach them with assign=True.

    A model just built on the meta device has every tensor still meta; quant's NF4 loader has attached its
    quantized layers already and passes the rest. Missing, unexpected or misshapen tensors are a CheckpointError
    naming `source`."""
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if v.is_meta}
    if model.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    # HF keeps the (recomputable) rotary inv_freq in some old checkpoints: not a weight
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s): {_listed(missing)}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s): {_listed(unexpected)}")
    for k, p in expected.items():
        if tuple(sd[k].shape) != tuple(p.shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(sd[k].shape)}, "
                                  f"config.json implies {tuple(p.shape)}")
    model.load_state_dict({k: sd[k] for k in expected}, strict=False, assign=True)
    model.tie_weights()


def from_state_dict(cfg: ModelConfig, sd: dict, source: str) -> Transformer:
    """A Transformer (eval mode) holding `sd`'s tensors, in their dtype and on their device."""
    with torch.device("meta"):
        model = Transformer(cfg)
    load_state_dict_into(model, sd, source)
    return model.eval()


def write_weights(model: Transformer, path, max_shard_bytes: int = 5 * 2**30, config_updates: dict | None = None):
    """Write config.json + model.safetensors (or shards + model.safetensors.index.json above max_shard_bytes),
    the layout transformers loads, into the existing directory `path` (the caller's atomic_dir)."""
    path = Path(path)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # HF re-ties it from embed_tokens
    cfg = model.cfg.to_hf()
    cfg.update(config_updates or {})
    cfg["torch_dtype"] = cfg["dtype"] = str(model.dtype).removeprefix("torch.")
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v.cpu(), size + n
    shards.append(cur)
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
