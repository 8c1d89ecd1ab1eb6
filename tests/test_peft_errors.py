"""Bad input to peft/: each is a one-line ValueError that names the key, file or tensor."""
import json

import pytest
import torch

import model as nt
import peft
from tests.reference import tiny_hf_config


def tiny(arch="llama", **over):
    return nt.Transformer(nt.ModelConfig.from_hf(tiny_hf_config(arch, **over))).init_weights(seed=0)


def one_line_error(fn, *match):
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


def test_unknown_target_lists_available_modules():
    one_line_error(lambda: peft.apply(tiny(), peft.LoraConfig(targets=["q_proj", "qkv_proj"])),
                   "LoraConfig.targets", "'qkv_proj'", "available: down_proj, gate_proj, k_proj")


def test_regex_matching_nothing():
    one_line_error(lambda: peft.apply(tiny(), peft.LoraConfig(targets=r".*\.c_attn")), "regex", "c_attn")


@pytest.mark.parametrize("r", [0, -2])
def test_rank_must_be_positive(r):
    one_line_error(lambda: peft.LoraConfig(r=r), "LoraConfig.r", str(r))


def test_shape_mismatch_names_the_tensor(tmp_path):
    m = peft.apply(tiny(), peft.LoraConfig(r=4, targets=["q_proj"]))
    peft.save_adapter(m, tmp_path / "a")
    other = tiny(hidden_size=32, intermediate_size=48)
    one_line_error(lambda: peft.load_adapter(other, tmp_path / "a"),
                   "adapter_model.safetensors", "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                   "(4, 64)", "(4, 32)")


def test_missing_tensor_names_it(tmp_path):
    m = peft.apply(tiny(), peft.LoraConfig(r=4, targets=["q_proj"]))
    peft.save_adapter(m, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    one_line_error(lambda: peft.load_adapter(tiny(), tmp_path / "a"), "missing tensor", "v_proj.lora_A.weight")


def test_unknown_peft_type(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA", "r": 4}))
    one_line_error(lambda: peft.load_adapter(tiny(), tmp_path), "adapter_config.json", "unknown peft_type 'VERA'")


def test_dir_without_adapter_config(tmp_path):
    one_line_error(lambda: peft.load_adapter(tiny(), tmp_path), str(tmp_path), "no adapter_config.json")


def test_unsupported_peft_option_is_refused(tmp_path):
    m = peft.apply(tiny(), peft.LoraConfig(r=4))
    peft.save_adapter(m, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"q_proj": 8}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    one_line_error(lambda: peft.load_adapter(tiny(), tmp_path / "a"), "rank_pattern", "not supported")


def test_apply_twice_and_merge_without_method():
    m = peft.apply(tiny(), peft.LoraConfig(r=4))
    one_line_error(lambda: peft.apply(m, peft.LoraConfig(r=4)), "already has a LoraConfig")
    one_line_error(lambda: peft.merge(tiny()), "no PEFT method applied")


def test_save_is_atomic_and_overwrites(tmp_path):
    m = peft.apply(tiny(), peft.LoraConfig(r=4))
    peft.save_adapter(m, tmp_path / "a", base_model_path="some/base")
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.lora_B.weight.fill_(0.5)
    peft.save_adapter(m, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    d = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert d["base_model_name_or_path"] == "some/base" and d["r"] == 4 and d["peft_type"] == "LORA"
    m2 = peft.load_adapter(tiny(), tmp_path / "a")
    assert torch.equal(m2.model.layers[0].self_attn.q_proj.lora_B.weight, m.model.layers[0].self_attn.q_proj.lora_B.weight)


def test_ia3_feedforward_must_be_a_subset_of_targets():
    one_line_error(lambda: peft.apply(tiny(), peft.IA3Config(targets=["k_proj"], feedforward=["down_proj"])),
                   "IA3Config.feedforward", "subset")


def test_pickle_adapter_is_refused_and_bad_json_is_named(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80")
    one_line_error(lambda: peft.load_adapter(tiny(), tmp_path), "no adapter_model.safetensors", "pickle")
    (tmp_path / "adapter_config.json").write_text("{not json")
    one_line_error(lambda: peft.load_adapter(tiny(), tmp_path), "adapter_config.json", "invalid JSON")
