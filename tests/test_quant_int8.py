"""LLM.int8 (quant/int8.py) against bitsandbytes on CPU: Int8Params bytes, Linear8bitLt's forward with the outlier
decomposition, transformers' load_in_8bit checkpoints both ways, LoRA / DoRA on the int8 base, lora8 in train.py."""
import json

import pytest
import torch

import model as M
import peft
from model.io import CheckpointError
from peft.lora import LoraConfig
from quant.int8 import (Int8Linear, Lora8Linear, Dora8Linear, dequantize_rows, int8_linear, int8_mm, load_int8,
                        merge_dequantized, quantize_input, quantize_rows, save_int8)
from tests.reference import make_hf_model, run_reference, tiny_hf_config
from tests.tiny import make_model, run_inputs, run_train

bnb = pytest.importorskip("bitsandbytes")
IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 100, 3], [4, 8, 15, 16, 23, 42, 64, 127]])


def _weight(out, inp, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[3, 7] = 1.7                                       # a row with a large entry (its SCB comes from it)
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_and_scb_equal_bitsandbytes_int8params(dtype):
    w = _weight(96, 1536, dtype=dtype)
    p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).cpu()  # quantizes on .cpu()
    cb, scb = quantize_rows(w)
    assert p.dtype == torch.int8 and cb.dtype == torch.int8 and scb.dtype == torch.float32
    assert torch.equal(cb, p.data) and torch.equal(scb, p.SCB)   # byte for byte
    assert torch.equal(dequantize_rows(cb, scb), bnb.functional.int8_vectorwise_dequant(p.data, p.SCB))


def test_int8_mm_is_exact_at_the_worst_case():
    """All ±127 over 3000 columns: sums of 4.8e7 > 2^24, where a single fp32 matmul would round."""
    a = torch.full((5, 3000), 127, dtype=torch.int8)
    b = torch.full((3, 3000), -127, dtype=torch.int8)
    b[1, ::2] = 127
    a[2, 5] = 1
    assert torch.equal(int8_mm(a, b).long(), a.long() @ b.long().t())


def _bnb_linear(w, bias, threshold):
    layer = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=bias is not None, has_fp16_weights=False,
                                threshold=threshold)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return layer.cpu().eval()   # eval: bitsandbytes' MatMul8bitLt (in training mode its CPU path is dequantized)


@pytest.mark.parametrize("threshold", [6.0, 0.0])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16])
def test_forward_matches_bitsandbytes_linear8bitlt(threshold, xdtype):
    w, bias = _weight(96, 1536), torch.randn(96) * 0.1
    x = torch.randn(2, 7, 1536)
    x[:, :, [3, 100, 1200]] *= 12                          # outlier feature dimensions, as in the paper (fig. 3)
    x[0, 2, 50] = -9.0                                     # a lone outlier: its whole column goes 16-bit
    x = x.to(xdtype)
    ref = _bnb_linear(w, bias, threshold)
    ours = Int8Linear.from_linear(torch.nn.Linear(1536, 96).requires_grad_(False), threshold)
    ours.weight.copy_(ref.weight.data)
    ours.SCB.copy_(ref.weight.SCB)
    ours.bias.data = bias.clone()
    with torch.no_grad():
        y_ref, y = ref(x), ours(x)
    _, _, cols = quantize_input(x.reshape(-1, 1536), threshold)
    assert threshold == 0 or set(cols.tolist()) == {3, 50, 100, 1200}
    assert y.dtype == y_ref.dtype == xdtype
    # bitsandbytes' CPU int8 product is one fp32 matmul (rounding once sums pass 2^24), ours exact: the bound is
    # 1e-6 relative for fp32 outputs, fp16's half-ulp (2^-11 relative) for fp16 ones (exact figure not yet printed)
    err = ((y.float() - y_ref.float()).abs() / y_ref.float().abs().clamp_min(1e-3)).max().item()
    assert err <= (2 ** -11 if xdtype == torch.float16 else 1e-6), err


def test_decomposition_error_is_small_and_outliers_help():
    """The paper's point (section 3.3): with a few large feature dimensions, int8 alone loses them (error
    dominated by the outliers' row scale); the decomposition keeps the 16-bit part exact."""
    w = _weight(64, 512)
    x = torch.randn(32, 512)
    x[:, [7, 300]] *= 40
    exact = x @ dequantize_rows(*quantize_rows(w)).t()
    cb, scb = quantize_rows(w)
    e_mixed = (int8_linear(x, cb, scb, None, 6.0) - exact).abs().max() / exact.abs().max()
    e_plain = (int8_linear(x, cb, scb, None, 0.0) - exact).abs().max() / exact.abs().max()
    assert e_mixed < 0.01 and e_plain > 3 * e_mixed, (e_mixed, e_plain)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A tiny random llama (fp32, widened norms), quantized + saved by transformers + bitsandbytes (8-bit), with
    its logits."""
    wd = tmp_path_factory.mktemp("bnb8")
    cfg = tiny_hf_config("llama")
    make_hf_model(wd, cfg, name="fp", norm_gain=8)      # large activations: outlier columns occur
    out = run_reference(f"""
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        q = AutoModelForCausalLM.from_pretrained("fp", quantization_config=BitsAndBytesConfig(load_in_8bit=True,
                                                 llm_int8_threshold=6.0), dtype=torch.float32, device_map="cpu")
        q.eval()
        with torch.no_grad():
            logits = q(load_file("in.safetensors")["ids"]).logits
        q.save_pretrained("q8")
        save_file({{"logits": logits}}, "out.safetensors")
    """, wd, {"ids": IDS})
    return wd, out["logits"]


def _logits(model):
    with torch.no_grad():
        return model(IDS).float()


def test_transformers_8bit_dir_loads_with_same_logits(ref):
    wd, logits = ref
    model = load_int8(wd / "q8")
    assert isinstance(model.model.layers[1].mlp.down_proj, Int8Linear) and not isinstance(model.lm_head, Int8Linear)
    # same int8 products; the rest (attention, norms) is ours vs transformers' fp32: 1e-5 as tests/test_model.py
    torch.testing.assert_close(_logits(model), logits, atol=1e-5, rtol=1e-5)
    ours = load_int8(wd / "fp")                         # quantized at load: the same bytes as transformers stored
    for (name, a), b in zip(ours.named_modules(), model.modules()):
        if isinstance(a, Int8Linear):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.SCB, b.SCB), name


def test_saved_dir_loads_in_transformers_with_same_logits(ref, tmp_path):
    wd, _ = ref
    model = load_int8(wd / "fp")
    save_int8(model, tmp_path / "ours")
    qc = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    assert qc["load_in_8bit"] is True and qc["llm_int8_threshold"] == 6.0
    theirs = run_reference(f"""
        from transformers import AutoModelForCausalLM
        import bitsandbytes as bnb
        m = AutoModelForCausalLM.from_pretrained("{tmp_path / 'ours'}", dtype=torch.float32, device_map="cpu")
        assert isinstance(m.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
        m.eval()
        with torch.no_grad():
            save_file({{"logits": m(load_file("in.safetensors")["ids"]).logits}}, "out.safetensors")
    """, tmp_path / "ref", {"ids": IDS})["logits"]
    torch.testing.assert_close(theirs, _logits(model), atol=1e-5, rtol=1e-5)
    assert torch.equal(_logits(load_int8(tmp_path / "ours")), _logits(model))   # our own reload: exact


@pytest.mark.parametrize("dora", [False, True])
def test_lora_on_int8_equals_lora_on_dequantized_base(tmp_path, dora):
    """LoRA8 vs LoRA over the dense dequantized base with the same adapter: loss and adapter grads differ only
    by the int8 activation quantization. Measured (this tiny model): loss ~1e-4 relative, grads ~1e-2 relative;
    without any LoRA branch, the base's own logit error sets the scale."""
    d = make_model(tmp_path / "m", seed=3)
    cfg = LoraConfig(r=4, alpha=8, targets="all-linear", dora=dora)
    q = peft.apply(load_int8(d), cfg)
    dense = M.load_pretrained(d)
    for name, m in q.named_modules():
        if isinstance(m, Int8Linear | Lora8Linear):
            dense.get_submodule(name).weight.data = m.dequantize()
    dense = peft.apply(dense, cfg)
    torch.manual_seed(0)
    for (n, p), (n2, p2) in zip(peft.core.adapter_parameters(q).items(), peft.core.adapter_parameters(dense).items()):
        assert n == n2
        if "lora_B" in n:
            p.data = torch.randn_like(p) * 0.05
        p2.data = p.data.clone()
    assert sum(isinstance(m, Dora8Linear if dora else Lora8Linear) for m in q.modules()) == 14
    labels = IDS.clone()
    losses, grads = [], []
    for m in (q, dense):
        m.train()
        logits = m(IDS)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in peft.core.adapter_parameters(m).values()]))
    rel_loss = abs(losses[0] - losses[1]) / losses[1]
    rel_grad = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
    with torch.no_grad():
        base_err = ((_logits(load_int8(d)) - _logits(M.load_pretrained(d))).norm() /
                    _logits(M.load_pretrained(d)).norm()).item()
    print(f"int8 base logit error {base_err:.2e}; LoRA loss {rel_loss:.2e}, grads {rel_grad:.2e} (dora={dora})")
    assert rel_loss < 1e-3 and rel_grad < 3e-2 and rel_grad > 0  # non-zero: the int8 path really ran


def test_train_lora8_with_merge(tmp_path):
    inp = run_inputs(tmp_path, 12)
    out = tmp_path / "run"
    run_train(["--model", inp["model"], "--data", inp["data"], "--out", str(out), "--method", "lora8",
               "--max-steps", "3", "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--merge", "--quiet"])
    q = peft.load_adapter(load_int8(inp["model"]), out / "adapter")
    assert any(isinstance(m, Lora8Linear) for m in q.modules())
    merged = M.load_pretrained(out / "model")
    expect = merge_dequantized(q)
    assert "quantization_config" not in json.loads((out / "model" / "config.json").read_text())
    for (n, a), b in zip(merged.state_dict().items(), expect.state_dict().values()):
        assert torch.equal(a, b), n


def test_bad_inputs(ref, tmp_path):
    wd, _ = ref
    model = load_int8(wd / "fp")
    with pytest.raises(ValueError, match=r"^IA3Config: the model has LLM.int8 layers; only LoRA"):
        peft.apply(model, peft.method_config("ia3", {}, str(wd / "fp")))
    # an 8-bit weight on a layer LLM.int8 can't run (a norm): named, one line
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((wd / "q8" / "config.json").read_text())
    sd = load_file(wd / "q8" / "model.safetensors")
    sd["model.norm.SCB"] = torch.ones(64)
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.norm.SCB: an 8-bit weight on RMSNorm .*only linear") as e:
        load_int8(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(RuntimeError, match="merge_dequantized"):
        peft.merge(peft.apply(model, LoraConfig(r=2, alpha=4, targets=["q_proj"])))
