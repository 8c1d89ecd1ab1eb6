"""GGUF import of the architectures beyond llama (model/gguf.py) against transformers: tiny random HF models are
written as GGUF the way llama.cpp's convert_hf_to_gguf.py writes them (the `gguf` package's GGUFWriter, its
TensorNameMap for the tensor names, its metadata keys; experts stacked, Gemma's norms + 1, llama's q/k rows
permuted, Phi-3's LongRoPE factors as tensors), and our import gives transformers' logits (padding included)."""
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model import load_pretrained
from model.weights import CheckpointError
from tests.reference import padded_batch, run_reference, tiny_hf_config
from tests.test_model_archs import CONFIGS, LONGROPE, MOE

# what a GGUF can say (llama.cpp's assumptions: query_pre_attn_scalar = head_dim, Gemma 3's local base 10000)
GEMMA3 = {**CONFIGS["gemma3_text"], "final_logit_softcapping": None}
GEMMA3.pop("layer_types")
GEMMA3.update(sliding_window_pattern=2, rope_parameters={
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
CASES = {  # name -> (llama.cpp architecture, config.json)
    "qwen2": ("qwen2", tiny_hf_config("qwen2")),
    "qwen3": ("qwen3", tiny_hf_config("qwen3")),
    "gemma": ("gemma", {**CONFIGS["gemma"], "tie_word_embeddings": True}),  # llama.cpp has no Gemma output.weight
    "gemma2": ("gemma2", {**CONFIGS["gemma2"], "query_pre_attn_scalar": 16}),
    "gemma3_text": ("gemma3", GEMMA3),
    "phi3": ("phi3", CONFIGS["phi3"]),
    "phi3-longrope": ("phi3", CONFIGS["phi3-longrope"]),
    "mixtral": ("llama", CONFIGS["mixtral"]),
    "qwen2_moe": ("qwen2moe", tiny_hf_config("qwen2_moe", num_experts=4, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=48, **MOE)),
    "qwen3_moe": ("qwen3moe", CONFIGS["qwen3_moe"]),
}


def write_gguf(hf_dir, path, arch: str, c: dict):
    """convert_hf_to_gguf.py in miniature, for tiny fp32 models: metadata and F32 tensors."""
    import gguf
    sd = load_file(f"{hf_dir}/model.safetensors")
    w = gguf.GGUFWriter(str(path), arch)
    n, heads, kv = c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim", c["hidden_size"] // heads)
    w.add_block_count(n)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    rope = c.get("rope_parameters", {}).get("full_attention", {})
    w.add_rope_freq_base(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
    w.add_rope_dimension_count(int(hd * c.get("partial_rotary_factor", 1.0)))
    if "sliding_window" in c and c["sliding_window"]:
        w.add_sliding_window(c["sliding_window"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c["attn_logit_softcapping"])
        w.add_final_logit_softcapping(c["final_logit_softcapping"])
    if arch == "gemma3":
        w.add_sliding_window_pattern(c["sliding_window_pattern"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if c.get("rope_scaling", {}).get("rope_type") == "longrope":
        w.add_rope_scaling_orig_ctx_len(c["original_max_position_embeddings"])
        w.add_tensor("rope_factors_long.weight", np.array(c["rope_scaling"]["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(c["rope_scaling"]["short_factor"], dtype=np.float32))
    if "num_experts" in c or "num_local_experts" in c:
        w.add_expert_count(c.get("num_experts", c.get("num_local_experts")))
        w.add_expert_used_count(c["num_experts_per_tok"])
        if arch != "llama":
            w.add_expert_feed_forward_length(c["moe_intermediate_size"])
        if c.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c["vocab_size"])])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n)
    experts = {}
    for k in sorted(sd, key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)]):
        v = sd[k]
        m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)\.weight", k)
        if m:  # llama.cpp stacks the experts: (E, out, in) under <...>.experts.<proj>.weight
            experts.setdefault(f"{m[1]}.{m[3]}.weight", []).append(v)
            if len(experts[f"{m[1]}.{m[3]}.weight"]) < w_experts(c):
                continue
            k, v = f"{m[1]}.{m[3]}.weight", torch.stack(experts[f"{m[1]}.{m[3]}.weight"])
        if k == "lm_head.weight" and c.get("tie_word_embeddings"):
            continue
        if arch.startswith("gemma") and k.endswith("norm.weight"):
            v = v + 1  # llama.cpp's Gemma norms multiply by the stored gain
        if arch == "llama" and k.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's LlamaModel.permute
            h = heads if "q_proj" in k else kv
            v = v.reshape(h, 2, v.shape[0] // h // 2, -1).transpose(1, 2).reshape(v.shape)
        w.add_tensor(names.get_name(k, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(v.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def w_experts(c):
    return c.get("num_experts", c.get("num_local_experts"))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    work = tmp_path_factory.mktemp("gguf_archs")
    ids, mask = padded_batch()
    out = run_reference(f"""
        from transformers import AutoConfig, AutoModelForCausalLM
        x = load_file("in.safetensors")
        res = {{}}
        for i, (name, cfg) in enumerate(json.loads({json.dumps(json.dumps({k: c for k, (_, c) in CASES.items()}))}).items()):
            torch.manual_seed(i)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32).eval()
            with torch.no_grad():  # HF inits norms to 1 (0 for Gemma) and biases to 0: randomise them
                for n, p in model.named_parameters():
                    if "norm" in n or n.endswith("bias") or n.endswith("gate.weight"):
                        p.add_(torch.randn_like(p) * 0.1)
                model.save_pretrained(name)
                res[name] = model(input_ids=x["ids"], attention_mask=x["mask"]).logits
        save_file(res, "out.safetensors")
    """, work, {"ids": ids, "mask": mask})
    return work, out


@pytest.mark.parametrize("name", list(CASES))
def test_gguf_import_gives_transformers_logits(hf, name, tmp_path):
    work, ref = hf
    arch, c = CASES[name]
    write_gguf(work / name, tmp_path / "m.gguf", arch, c)
    ours = load_pretrained(tmp_path / "m.gguf")
    assert ours.cfg.model_type == c["model_type"]
    ids, mask = padded_batch()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
    err = (got - ref[name])[mask.bool()].abs().max().item()
    print(f"{name} ({arch} GGUF): logits max-abs {err:.1e}")
    assert err <= 1e-5


def test_unsupported_gguf_architecture_is_a_one_line_error(tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "deepseek2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"GGUF architecture 'deepseek2' is not supported \(supported: llama, "
                                              r"qwen2, qwen3, gemma, gemma2, gemma3, phi3, qwen2moe, qwen3moe\)") as e:
        load_pretrained(tmp_path / "x.gguf")
    assert "\n" not in str(e.value)
