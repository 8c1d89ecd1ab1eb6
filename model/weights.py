"""A state dict <-> a Transformer, whatever file it came from or goes to: the checks and the attach on load, the
config.json + safetensors files on save, and CheckpointError, the one error type of a bad checkpoint.

It sits below the formats: io.py (HF directories) and gguf.py (llama.cpp files) both read tensors into a state
dict and hand it here, so the GGUF converter needs nothing from the HF loader and the loader calls the converter
from above. On load the model is built on the meta device and the tensors are attached with
`load_state_dict(assign=True)`: nothing is allocated twice and nothing is copied.
"""
import contextlib
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from .model import ModelConfig, Transformer


class CheckpointError(ValueError):
    """A bad checkpoint: the message is one line naming the file and the problem."""


def first_line(e: Exception) -> str:
    """An exception's message cut to one line (libraries' errors run over several), or its type's name."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")


def check_layers(n_layers: int, names, source, key: str = "num_hidden_layers", prefix: str = "model.layers."):
    """The stored tensors hold exactly layers 0 .. n_layers-1 (tensor names `<prefix><i>.`), checked from their
    names before anything is built: a model of a config's 100000 layers over a file's 2 would take minutes."""
    at = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m[1]) for m in map(at.match, names) if m}
    if found != set(range(n_layers)):
        raise CheckpointError(f"{source}: {key} is {n_layers} but the weights hold {len(found)} layers "
                              f"(indices {_listed([str(i) for i in sorted(found)]) or 'none'})")


_INITS = (torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_, torch.Tensor.normal_,
          torch.Tensor.uniform_)


class _NoInit(TorchFunctionMode):
    """Random init skipped: on the meta device there is nothing to fill, and meta normal_ is a Python reference
    kernel whose first call imports torch._dynamo (~2 s of every load, before any check could fail)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _INITS:  # nn.init's functions pass the tensor by keyword, Tensor's methods as self
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def meta_device():
    """Modules built inside have every tensor on the meta device (names and shapes, nothing allocated), and skip
    their random init."""
    with torch.device("meta"), _NoInit():
        yield


def meta_model(cfg: ModelConfig) -> Transformer:
    """The model with every tensor on the meta device: its names and shapes, nothing allocated."""
    with meta_device():
        return Transformer(cfg)


def check_shapes(model: Transformer, shapes: dict[str, tuple], source, config: str = "config.json") -> list[str]:
    """Check stored tensors' names and shapes (`shapes`: name -> shape, e.g. from a safetensors header, before any
    data is read) against the model's still-meta tensors. A model just built on the meta device has every tensor
    still meta; quant's NF4 loader has attached its quantized layers already and passes the rest. Missing,
    unexpected or misshapen tensors are a CheckpointError naming `source` (and `config`, where the shapes come from).
    Returns the names to attach."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if v.is_meta}
    if model.cfg.tie_word_embeddings:  # some tied checkpoints store lm_head anyway
        expected.pop("lm_head.weight", None)
        shapes = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    # HF keeps the (recomputable) rotary inv_freq in some old checkpoints: not a weight
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s): {_listed(missing)}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s): {_listed(unexpected)}")
    for k, shape in expected.items():
        if tuple(shapes[k]) != shape:
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(shapes[k])}, {config} implies {shape}")
    return list(expected)


def load_state_dict_into(model: Transformer, sd: dict, source: str):
    """Check `sd`'s names and shapes against the model's still-meta tensors (check_shapes), then attach them with
    assign=True."""
    names = check_shapes(model, {k: tuple(v.shape) for k, v in sd.items()}, source)
    model.load_state_dict({k: sd[k] for k in names}, strict=False, assign=True)
    model.tie_weights()


def from_state_dict(cfg: ModelConfig, sd: dict, source: str) -> Transformer:
    """A Transformer (eval mode) holding `sd`'s tensors, in their dtype and on their device."""
    check_layers(cfg.num_hidden_layers, sd, source)
    model = meta_model(cfg)
    load_state_dict_into(model, sd, source)
    return model.eval()


def hf_config(model: Transformer, config_updates: dict | None = None) -> dict:
    """The config.json transformers reads for `model`, with its weights' dtype."""
    cfg = model.cfg.to_hf()
    cfg.update(config_updates or {})
    cfg["torch_dtype"] = cfg["dtype"] = str(model.dtype).removeprefix("torch.")
    return cfg


def write_weights(model: Transformer, path, max_shard_bytes: int = 5 * 2**30, config_updates: dict | None = None):
    """Write config.json + model.safetensors (or shards + model.safetensors.index.json above max_shard_bytes),
    the layout transformers loads, into the existing directory `path` (the caller's atomic_dir)."""
    path = Path(path)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # HF re-ties it from embed_tokens
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v.cpu(), size + n
    shards.append(cur)
    (path / "config.json").write_text(json.dumps(hf_config(model, config_updates), indent=2) + "\n")
    write_shards(path, shards, len(shards))


def write_shards(path: Path, shards, n: int):
    """Write the n state-dict pieces of the iterable `shards` (consumed one at a time: dist/save.py streams them)
    as model.safetensors (n = 1) or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(v.numel() * v.element_size() for v in shard.values())
    if n > 1:
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
