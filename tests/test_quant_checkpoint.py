"""bitsandbytes 4-bit HF checkpoints: transformers + bitsandbytes save -> we load (no bitsandbytes in-process), and
we save -> transformers + bitsandbytes load, with the same logits."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.io import CheckpointError
from quant.checkpoint import load_nf4, save_nf4
from quant.linear import NF4Linear
from tests.reference import make_hf_model, run_reference, tiny_hf_config

IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 100, 3], [4, 8, 15, 16, 23, 42, 64, 127]])
# (name, double quant, quant_storage, max_shard_size); the sharded one is re-sharded to split siblings too
VARIANTS = [("dq_sharded", True, "uint8", "30KB"), ("plain_bf16_storage", False, "bfloat16", "5GB")]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A tiny random llama saved fp32, then quantized/saved by transformers + bitsandbytes, with its logits."""
    wd = tmp_path_factory.mktemp("bnb_ckpt")
    # every in_features a multiple of the 64-value block: bitsandbytes 0.50.2's AVX-512 CPU dequantize gets blocks
    # that straddle two rows wrong (its generic kernel and ours agree), and it is the reference here
    cfg = tiny_hf_config("llama", intermediate_size=128)
    make_hf_model(wd, cfg, name="fp")
    out = run_reference(f"""
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        ids = load_file("in.safetensors")["ids"]
        out = {{}}
        for name, dq, storage, shard in {VARIANTS!r}:
            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=dq,
                                     bnb_4bit_compute_dtype=torch.float32,
                                     bnb_4bit_quant_storage=getattr(torch, storage))
            q = bnb_generic_cpu(AutoModelForCausalLM.from_pretrained("fp", quantization_config=bnb,
                                                                     dtype=torch.float32, device_map="cpu"))
            with torch.no_grad():
                out[name] = q(ids).logits
            q.save_pretrained(name, max_shard_size=shard)
        save_file(out, "out.safetensors")
    """, wd, {"ids": IDS})
    return wd, out


def _alternate_shards(src, dst):
    """Re-shard a checkpoint so that consecutive keys alternate between two files: every quantized weight then
    has its siblings (absmax, quant_state, ...) in the other shard (transformers keeps them together)."""
    dst.mkdir()
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(f))
    keys = sorted(sd)
    shards = {"a.safetensors": keys[0::2], "b.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, dst / name, metadata={"format": "pt"})
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    p = "model.layers.0.mlp.down_proj.weight"
    assert weight_map[p] != weight_map[p + ".absmax"]
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def _logits(model):
    with torch.no_grad():
        return model(IDS)


@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
def test_load_bitsandbytes_dir_matches_transformers(ref, variant, tmp_path):
    wd, out = ref
    src = wd / variant
    if variant == "dq_sharded":
        assert (src / "model.safetensors.index.json").is_file()
        src = _alternate_shards(src, tmp_path / "split")
    model = load_nf4(src)
    assert isinstance(model.model.layers[1].mlp.down_proj, NF4Linear) and not isinstance(model.lm_head, NF4Linear)
    assert torch.equal(_logits(model), out[variant])  # bit-exact: same dequantized weights, same fp32 matmuls


def test_quantize_at_load_equals_bitsandbytes_bytes(ref):
    """Quantizing the fp32 dir ourselves at load time gives bitsandbytes' packed bytes and absmax."""
    wd, _ = ref
    ours = load_nf4(wd / "fp", quantize=True, double_quant=False)
    theirs = load_nf4(wd / "plain_bf16_storage")
    for (name, a), b in zip(ours.named_modules(), theirs.modules()):
        if isinstance(a, NF4Linear):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.absmax, b.absmax), name


def test_saved_dir_loads_in_transformers_with_same_logits(ref, tmp_path):
    wd, _ = ref
    model = load_nf4(wd / "fp", quantize=True, double_quant=True)
    save_nf4(model, tmp_path / "ours")
    qc = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    theirs = run_reference(f"""
        from transformers import AutoModelForCausalLM
        import bitsandbytes as bnb
        m = bnb_generic_cpu(AutoModelForCausalLM.from_pretrained("{tmp_path / 'ours'}", dtype=torch.float32,
                                                                 device_map="cpu"))
        assert isinstance(m.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
        with torch.no_grad():
            save_file({{"logits": m(load_file("in.safetensors")["ids"]).logits}}, "out.safetensors")
    """, tmp_path / "ref", {"ids": IDS})["logits"]
    assert torch.equal(theirs, _logits(model))
    # and our own reload is exact
    assert torch.equal(_logits(load_nf4(tmp_path / "ours")), _logits(model))


def _edit(src, dst, fn_tensors=None, fn_config=None):
    shutil.copytree(src, dst)
    if fn_tensors:
        sd = load_file(dst / "model.safetensors")
        fn_tensors(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    if fn_config:
        c = json.loads((dst / "config.json").read_text())
        fn_config(c)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_bad_checkpoints(ref, tmp_path):
    wd, _ = ref
    src = wd / "plain_bf16_storage"
    qs = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"

    def corrupt(sd):
        sd[qs] = torch.tensor(list(b'{"quant_type": "nf4", "blocksize": 6'), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight\.quant_state\.bitsandbytes__nf4: corrupt quant_state JSON"):
        load_nf4(_edit(src, tmp_path / "a", corrupt))

    def wrong_shape(sd):
        meta = json.loads(bytes(sd[qs].tolist()))
        meta["shape"] = [64, 66]
        sd[qs] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=r"q_proj: packed data has 2048 bytes but shape \[64, 66\] needs 2112"):
        load_nf4(_edit(src, tmp_path / "b", wrong_shape))

    def fp4(c):
        c["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    with pytest.raises(CheckpointError, match="bnb_4bit_quant_type 'fp4' is not supported"):
        load_nf4(_edit(src, tmp_path / "c", fn_config=fp4))
    with pytest.raises(CheckpointError, match="has no quantization_config"):
        load_nf4(wd / "fp")
