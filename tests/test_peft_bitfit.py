"""BitFit (nanotune's own format: HF PEFT has no BitFit). Proofs: identity at init, gradients only on biases,
save/load round trip exact, and the merged checkpoint (config.json bias flags set) loads in transformers with
the same logits. Reference work in one subprocess (tests/peft_cases.py)."""
import json

import pytest
import torch

import model as nt
import peft
from tests import peft_cases as pc
from tests.reference import tiny_hf_config

CASES = {  # (arch, name) -> our config kwargs
    ("qwen2", "existing"): {},                                          # Qwen2's own q/k/v biases
    ("llama", "added"): dict(targets=["q_proj", "v_proj", "down_proj"]),  # new zero biases on a bias-free model
    ("llama", "all_linear"): dict(targets="all-linear"),
    ("qwen2", "added_qkv"): dict(targets=r".*\.(q|k|v)_proj"),         # existing biases: nothing added
}
ARCHS = ("llama", "qwen2")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    cases = {name: (lambda kw=kw: peft.BitFitConfig(**kw)) for (_, name), kw in CASES.items()}
    out = pc.build(tmp_path_factory.mktemp("peft_bitfit"), ARCHS, cases, None, pairs=list(CASES))
    return out


def _qkv_bias_numel(cfg):
    return cfg.num_hidden_layers * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim


@pytest.mark.parametrize("arch,case", list(CASES))
def test_identity_at_init(ref, arch, case):
    pc.check_identity_at_init(ref, arch, case)


@pytest.mark.parametrize("arch,case", list(CASES))
def test_merged_checkpoint_loads_in_transformers(ref, arch, case):
    pc.check_merge(ref, arch, case)
    flags = json.loads((ref["tmp"] / "merged" / arch / case / "config.json").read_text())
    if arch == "llama":
        assert flags["attention_bias"] is True
        assert flags.get("mlp_bias", False) is (case in ("added", "all_linear"))


@pytest.mark.parametrize("arch,case", list(CASES))
def test_save_load_round_trip_exact(ref, arch, case):
    r = ref["ours"][(arch, case)]
    d = ref["tmp"] / "ours" / arch / case
    assert json.loads((d / "adapter_config.json").read_text())["peft_type"] == "BITFIT"
    m = peft.load_adapter(nt.load_pretrained(ref["hf"][arch]), d)
    with torch.no_grad():
        assert torch.equal(m(pc.IDS), r["logits"])
    for k, v in peft.bitfit.export_state(m).items():
        assert k.startswith("base_model.model.model.layers.") and k.endswith(".bias")


def test_trainable_counts(ref):
    cfg = nt.ModelConfig.from_hf(tiny_hf_config("qwen2"))
    assert ref["ours"][("qwen2", "existing")]["trainable"] == _qkv_bias_numel(cfg)
    assert ref["ours"][("qwen2", "added_qkv")]["trainable"] == _qkv_bias_numel(cfg)
    c = nt.ModelConfig.from_hf(tiny_hf_config("llama"))
    per_layer = c.num_attention_heads * c.head_dim + c.num_key_value_heads * c.head_dim + c.hidden_size
    assert ref["ours"][("llama", "added")]["trainable"] == c.num_hidden_layers * per_layer
    all_lin = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim + 2 * c.intermediate_size + 2 * c.hidden_size
    assert ref["ours"][("llama", "all_linear")]["trainable"] == c.num_hidden_layers * all_lin


@pytest.mark.parametrize("arch,kw", [("qwen2", {}), ("llama", dict(targets=["k_proj", "up_proj"]))])
def test_grads_only_on_biases_and_adamw_step(arch, kw):
    base = nt.Transformer(nt.ModelConfig.from_hf(tiny_hf_config(arch))).init_weights(seed=0)
    adapter = pc.check_grads_and_adamw_step(peft.apply(base, peft.BitFitConfig(**kw)))
    assert adapter and all(n.endswith(".bias") and p.grad.abs().sum() > 0 for n, p in adapter.items())


def test_bias_free_model_without_targets_is_an_error():
    base = nt.Transformer(nt.ModelConfig.from_hf(tiny_hf_config("llama"))).init_weights(seed=0)
    with pytest.raises(ValueError, match="no biases to train; name linears in targets"):
        peft.apply(base, peft.BitFitConfig())


def test_unexportable_bias_is_a_one_line_error():
    base = nt.Transformer(nt.ModelConfig.from_hf(tiny_hf_config("qwen2"))).init_weights(seed=0)
    m = peft.apply(base, peft.BitFitConfig(targets=["o_proj"]))
    with pytest.raises(ValueError, match=r"transformers' qwen2 has no bias on o_proj \(model.layers.0.self_attn"):
        peft.merge(m)
