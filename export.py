"""Write a model (with a LoRA / DoRA / IA3 / QLoRA adapter merged in first) as a GGUF file for llama.cpp / Ollama.

    python export.py MODEL_DIR OUT.gguf --type f32|f16|bf16|q8_0|q4_0 [--adapter DIR [--qlora]]

A top-level script like train.py (it uses model/, peft/ and quant/, so it sits above them; the reverse of
model/gguf.py's importer).

What llama.cpp's own converter (convert_hf_to_gguf.py) writes, and how:
- architecture `llama` (also for Mistral, as llama.cpp does: its llama code has no sliding window, so a Mistral
  with `sliding_window` set is refused), `qwen2` (q/k/v biases) and `qwen3` (q/k RMSNorm). Other model types,
  biases the architecture lacks, and llama3 rope scaling (llama.cpp wants a precomputed rope_freqs tensor) are
  refused with one line, before any weight is read.
- the metadata keys `{arch}.context_length`, `.embedding_length`, `.block_count`, `.feed_forward_length`,
  `.attention.head_count(_kv)`, `.attention.layer_norm_rms_epsilon`, `.rope.freq_base`, `.rope.dimension_count`,
  `.rope.scaling.type/factor` (linear), `.vocab_size`; `general.file_type` and `general.quantization_version`.
- llama's rotary code rotates interleaved pairs, HF's rotate-half pairs x_i with x_{i+hd/2}: q_proj/k_proj rows
  are permuted within each head, w.view(n_head, 2, hd/2, in).swapaxes(1, 2), the inverse of what model/gguf.py's
  importer undoes (qwen2/qwen3 use llama.cpp's NEOX rotation: no permutation).
- the tokenizer as `gpt2` byte-level BPE: tokens in id order (padded with [PADi] up to the model's vocab_size),
  token types (CONTROL for special added tokens, USER_DEFINED for other added ones), merges, bos/eos/pad/unk ids,
  add_bos/add_eos, the chat template, and the pre-tokenizer's llama.cpp name, recognised from tokenizer.json.
- tensor types: 1-D tensors (norms, biases) stay F32; 2-D weights become the `--type` (q8_0 / q4_0 by
  quant/ggml.py, our own block code; a matrix whose rows are not a multiple of 32 falls back to F16, as
  llama.cpp's converter does; q4_0 is llama-quantize's `--pure` Q4_0: every matrix, embeddings included).
The file is written next to OUT as OUT.tmp and renamed into place once complete (model/atomic.py).
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from model.atomic import atomic_file
from model.gguf import DIGIT_SPLIT_PRE, TENSOR_NAMES
from model.weights import CheckpointError

ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
EXTRA_NAMES = {  # GGUF name -> HF name, beyond the llama ones
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}
# llama.cpp's pre-tokenizer names for the split regexes of tokenizer.json (its converter hashes the output of
# a test text; we recognise the regex itself): Llama 3 groups digits by three, Qwen2 splits every digit
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def check_exportable(cfg, source) -> str:
    """The GGUF architecture name for a ModelConfig, or a one-line CheckpointError saying what can't be written."""
    arch = ARCH.get(cfg.model_type)
    why = None
    if arch is None:
        why = f"model_type {cfg.model_type!r} has no GGUF architecture here (supported: {', '.join(ARCH)})"
    elif cfg.model_type == "mistral" and cfg.sliding_window and cfg.sliding_window < cfg.max_position_embeddings:
        why = f"sliding_window={cfg.sliding_window}: llama.cpp's llama architecture has no sliding window"
    elif cfg.mlp_bias or (arch == "llama" and (cfg.attention_bias or cfg.o_bias)) or (arch != "llama" and cfg.o_bias):
        why = f"{cfg.model_type} with attention/MLP biases is not a {arch} GGUF"
    elif cfg.rope_scaling and cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) != "linear":
        why = f"rope_scaling {cfg.rope_scaling.get('rope_type')!r} is not written (supported: linear)"
    if why:
        raise CheckpointError(f"{source}: cannot export to GGUF: {why}")
    return arch


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp's pair-interleaved rows, per head (the converter's `permute`)."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).transpose(1, 2).reshape(out, inp)


def encode_tensor(w: torch.Tensor, kind: str):
    """(array, raw GGML type or None) for GGUFWriter.add_tensor: 1-D -> F32, 2-D -> `kind`."""
    from gguf import GGMLQuantizationType as T

    from quant.ggml import BLOCK, QUANTIZE
    w = w.detach().to("cpu", torch.float32).contiguous()
    if w.dim() == 1 or kind == "f32":
        return w.numpy(), None
    if kind in QUANTIZE and w.shape[1] % BLOCK == 0:
        return QUANTIZE[kind](w).numpy(), T.Q8_0 if kind == "q8_0" else T.Q4_0
    if kind == "bf16":  # torch's fp32 -> bf16 cast rounds to nearest even, as ggml_compute_fp32_to_bf16
        return w.to(torch.bfloat16).view(torch.uint8).numpy(), T.BF16
    return w.numpy().astype(np.float16), None


def gguf_tensors(model, arch: str):
    """(GGUF name, tensor) for every weight of a plain Transformer, q/k rows permuted for llama."""
    cfg, sd = model.cfg, model.state_dict()
    names = {**TENSOR_NAMES, **EXTRA_NAMES}
    for i in range(cfg.num_hidden_layers):
        for g, h in names.items():
            if "{i}" in g and h.format(i=i) in sd:
                w = sd[h.format(i=i)]
                if arch == "llama" and g.endswith(("attn_q.weight", "attn_k.weight")):
                    w = permute_qk(w, cfg.num_attention_heads if "attn_q" in g else cfg.num_key_value_heads)
                yield g.format(i=i), w
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    yield "output_norm.weight", sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        yield "output.weight", sd["lm_head.weight"]
    left = set(sd) - {h.format(i=i) for h in names.values() for i in range(cfg.num_hidden_layers)} \
        - {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    if left:
        raise CheckpointError(f"cannot export to GGUF: no GGUF name for {sorted(left)[0]}")


def pre_tokenizer_name(pre: dict | None, source) -> str:
    """llama.cpp's name for a tokenizer.json pre_tokenizer (what the importer's DIGIT_SPLIT_PRE reads back)."""
    parts = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [p.get("type") for p in parts]
    split = next((p["pattern"].get("Regex") for p in parts if p.get("type") == "Split"), None)
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return DIGIT_SPLIT_PRE[0]  # "smollm"
    if kinds[:1] == ["Split"] and kinds[1:] in ([], ["ByteLevel"]) and split in (LLAMA3_SPLIT, QWEN2_SPLIT):
        return "llama-bpe" if split == LLAMA3_SPLIT else "qwen2"
    raise CheckpointError(f"{source}: cannot export to GGUF: pre-tokenizer {json.dumps(pre)[:120]} is not one "
                          f"llama.cpp names here (gpt-2, smollm, llama-bpe, qwen2)")


def tokenizer_fields(tok, vocab_size: int, source) -> dict:
    """The tokenizer.* metadata of a byte-level BPE model.tokenizer.Tokenizer."""
    from gguf import TokenType
    if tok.is_sp:
        raise CheckpointError(f"{source}: cannot export to GGUF: sentencepiece tokenizers are not written "
                              f"(supported: byte-level BPE tokenizer.json)")
    d = json.loads(tok.backend.to_str())
    model, decoder = d.get("model") or {}, d.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise CheckpointError(f"{source}: cannot export to GGUF: tokenizer model {model.get('type')!r} with "
                              f"decoder {decoder.get('type')!r} is not byte-level BPE (llama.cpp's gpt2)")
    if (d.get("normalizer") or {}).get("type") not in (None, "NFC"):
        raise CheckpointError(f"{source}: cannot export to GGUF: normalizer {d['normalizer']['type']!r}")
    pre = pre_tokenizer_name(d.get("pre_tokenizer"), source)
    vocab = tok.backend.get_vocab(with_added_tokens=True)               # token -> id
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise CheckpointError(f"{source}: the tokenizer has {len(vocab)} tokens, more than the model's "
                              f"vocab_size {vocab_size}")
    added = {a["id"]: a.get("special", False) for a in d.get("added_tokens", [])}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i] else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {k: tok.token_to_id(tok.config.get(f"{k}_token") if k != "bos" else tok.bos_token)
           for k in ("bos", "eos", "pad", "unk")}
    ids["eos"] = tok.eos_id
    probe = tok.encode("a")  # what encode adds itself (add_bos_token, or a post-processor's template)
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges, "ids": ids,
            "add_bos": tok.bos_id is not None and probe[:1] == [tok.bos_id],
            "add_eos": tok.eos_id is not None and probe[-1:] == [tok.eos_id], "template": tok.chat_template}


def load_merged(model_dir, adapter=None, qlora: bool = False):
    """The plain Transformer to export: the base, or base + adapter merged in fp32 (QLoRA: into the dequantized
    NF4 base it was trained on, quant.qlora.merge_dequantized)."""
    import peft
    from model.io import load_pretrained
    if adapter and qlora:
        from quant import qlora as q
        return q.merge_dequantized(q.load_adapter(q.load_nf4(model_dir, quantize=True), adapter), torch.float32)
    model = load_pretrained(model_dir, dtype=torch.float32)
    if adapter is None:
        return model
    try:
        return peft.merge_and_unload(peft.load_adapter(model, adapter))
    except ValueError as e:
        raise CheckpointError(f"{adapter}: cannot export to GGUF: {e}") from None


def export(model_dir, out, kind: str = "f16", adapter=None, qlora: bool = False) -> Path:
    """Write MODEL_DIR (+ adapter merged) to the GGUF file `out`; returns its path."""
    from gguf import GGUFWriter, LlamaFileType

    from model.io import read_config
    from model.tokenizer import load_tokenizer
    if kind not in TYPES:
        raise CheckpointError(f"--type {kind!r}: expected one of {', '.join(TYPES)}")
    model_dir, out = Path(model_dir), Path(out)
    fields = None
    if model_dir.suffix != ".gguf":  # what can't be written is said before any weight is read
        cfg = read_config(model_dir)
        check_exportable(cfg, model_dir / "config.json")
        tok = load_tokenizer(model_dir)
        fields = tokenizer_fields(tok, cfg.vocab_size, model_dir)
    else:
        tok = load_tokenizer(model_dir)
    model = load_merged(model_dir, adapter, qlora)
    cfg = model.cfg
    arch = check_exportable(cfg, model_dir)
    fields = fields or tokenizer_fields(tok, cfg.vocab_size, model_dir)
    with atomic_file(out) as tmp:
        w = GGUFWriter(tmp, arch)
        w.add_name(model_dir.stem)
        w.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                         "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
                         "q4_0": LlamaFileType.MOSTLY_Q4_0}[kind])
        w.add_quantization_version(2)  # GGML_QNT_VERSION
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        if cfg.rope_scaling:  # linear (check_exportable refused the others)
            from gguf import RopeScalingType
            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
        w.add_vocab_size(cfg.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(fields["pre"])
        w.add_token_list(fields["tokens"])
        w.add_token_types(fields["types"])
        w.add_token_merges(fields["merges"])
        for k, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                       ("unk", w.add_unk_token_id)):
            if fields["ids"][k] is not None:
                add(fields["ids"][k])
        w.add_add_bos_token(fields["add_bos"])
        w.add_add_eos_token(fields["add_eos"])
        if fields["template"]:
            w.add_chat_template(fields["template"])
        for name, t in gguf_tensors(model, arch):
            arr, raw = encode_tensor(t, kind)
            w.add_tensor(name, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python export.py",
                                 description="Write a model (+ merged adapter) as a GGUF file for llama.cpp.")
    ap.add_argument("model", help="HF model directory (or .gguf file)")
    ap.add_argument("out", help="the .gguf file to write (replaced atomically if it exists)")
    ap.add_argument("--adapter", help="an adapter directory to merge in first (LoRA, DoRA, IA3, ...)")
    ap.add_argument("--qlora", action="store_true", help="the adapter was trained with --method qlora: merge "
                    "it into the NF4-dequantized base it saw")
    ap.add_argument("--type", default="f16", choices=TYPES)
    a = ap.parse_args(argv)
    try:
        print(export(a.model, a.out, a.type, a.adapter, a.qlora))
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
