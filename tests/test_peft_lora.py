"""LoRA / rsLoRA / DoRA proven against HF PEFT on tiny random llama and qwen2 models (reference work for the
whole module in one subprocess: see tests/peft_cases.py)."""
import types

import pytest
import torch

import model as nt
import peft
from tests import peft_cases as pc
from tests.reference import tiny_hf_config

ARCHS = ("llama", "qwen2")
CASES = {  # name -> our config kwargs (PEFT gets the same hyper-parameters)
    "lora": dict(r=4, alpha=8, targets=["q_proj", "v_proj"]),
    "rslora_gauss_all": dict(r=8, alpha=16, targets="all-linear", rslora=True, init="gaussian"),
    "regex": dict(r=2, alpha=4, targets=r".*\.(k_proj|down_proj)"),
    "dora": dict(r=4, alpha=8, targets=["q_proj", "k_proj", "o_proj", "up_proj"], dora=True),
    "dora_rslora_all": dict(r=4, alpha=8, targets="all-linear", dora=True, rslora=True),
}
PARAMS = [(a, c) for a in ARCHS for c in CASES]


def peft_kwargs(cfg: peft.LoraConfig) -> dict:
    d = cfg.to_json()
    return {k: d[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
                              "init_lora_weights", "task_type")}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return pc.build(tmp_path_factory.mktemp("peft_lora"), ARCHS,
                    {c: (lambda kw=kw: peft.LoraConfig(**kw)) for c, kw in CASES.items()},
                    {c: ("LoraConfig", peft_kwargs(peft.LoraConfig(**kw))) for c, kw in CASES.items()})


@pytest.mark.parametrize("arch,case", PARAMS)
def test_identity_at_init(ref, arch, case):
    pc.check_identity_at_init(ref, arch, case)


@pytest.mark.parametrize("arch,case", PARAMS)
def test_export_loads_in_hf_peft(ref, arch, case):
    pc.check_export_loads_in_hf_peft(ref, arch, case)


@pytest.mark.parametrize("arch,case", PARAMS)
def test_hf_peft_adapter_loads_in_ours(ref, arch, case):
    m = pc.check_hf_peft_adapter_loads_in_ours(ref, arch, case, peft.LoraConfig)
    assert m.peft_config.dora == CASES[case].get("dora", False)
    assert m.peft_config.rslora == CASES[case].get("rslora", False)


@pytest.mark.parametrize("arch,case", PARAMS)
def test_adapter_grads_match_peft(ref, arch, case):
    pc.check_grads_match_peft(ref, arch, case)


@pytest.mark.parametrize("arch,case", PARAMS)
def test_trainable_count_matches_peft(ref, arch, case):
    pc.check_trainable_count(ref, arch, case)


@pytest.mark.parametrize("arch,case", PARAMS)
def test_merge_unmerge_and_merged_checkpoint(ref, arch, case):
    pc.check_merge(ref, arch, case)


@pytest.mark.parametrize("case", ["lora", "dora"])
def test_grads_only_on_adapter_and_adamw_step(case):
    base = nt.Transformer(nt.ModelConfig.from_hf(tiny_hf_config("qwen2"))).init_weights(seed=0)
    m = peft.apply(base, peft.LoraConfig(**CASES[case]))
    adapter = pc.check_grads_and_adamw_step(m)
    assert all(adapter[n].grad.abs().sum() > 0 for n in adapter if "lora_B" in n or "magnitude" in n)
    assert "model.layers.0.self_attn.q_proj.weight" in m.state_dict()  # base keys keep their names


def test_dropout_only_on_lora_branch():
    base = nt.Transformer(nt.ModelConfig.from_hf(tiny_hf_config("llama"))).init_weights(seed=0)
    with torch.no_grad():
        y0 = base(pc.IDS)
    m = peft.apply(base, peft.LoraConfig(r=4, dropout=0.5, targets="all-linear"))
    m.train()
    with torch.no_grad():
        assert torch.equal(m(pc.IDS), y0)  # B = 0: dropout on the branch input can't change the output
        pc.randomize(m, 0)
        assert not torch.allclose(m(pc.IDS), m(pc.IDS))  # dropout is active in training
        m.eval()
        assert torch.equal(m(pc.IDS), m(pc.IDS))


def test_dora_norm_is_detached():
    """The paper (sec. 4.3) and PEFT: ||W + sBA|| is a constant in backward, so dL/dm = sum over the batch of
    (W' x / ||W'||) * dL/dy exactly (with L = sum y)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    d = peft.lora.DoraLinear.from_module(lin, peft.LoraConfig(r=2, alpha=2, dora=True))
    pc.randomize(torch.nn.ModuleDict({"d": d}), 1)
    x = torch.randn(3, 6)
    d(x).sum().backward()
    w = lin.weight + d.delta_weight()
    expected = ((x @ w.T) / w.norm(dim=1)).sum(0)
    assert torch.allclose(d.lora_magnitude_vector.grad, expected.detach(), atol=1e-6)


@pytest.mark.parametrize("dropout,bias,dtype", [(False, False, None), (True, True, None), (False, True, torch.bfloat16),
                                                (True, False, torch.bfloat16)])
def test_fused_lora_function_equals_autograd_on_the_plain_ops(dropout, bias, dtype):
    """LoraFunction's hand-written backward == autograd through F.linear + s * B A x_d (the unfused
    forward), for the input, the (separate, dropped-out) branch input, A, B and a trainable bias; under bf16
    autocast both sides run their matmuls in bf16."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, requires_grad=True)
    xd = torch.nn.functional.dropout(x, 0.5) if dropout else None
    w, b = torch.randn(7, 12), (torch.randn(7, requires_grad=True) if bias else None)
    A, B = torch.randn(3, 12, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    g = torch.randn(2, 5, 7)
    leaves = [t for t in (x, A, B, b) if t is not None]
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        layer = types.SimpleNamespace(compute_weight=w.to)  # what a LoraLinear gives the function
        y = peft.lora.LoraFunction.apply(x, xd, b, A, B, layer, 2.0, dtype or torch.float32)
        ref = torch.nn.functional.linear(x, w, b) + torch.nn.functional.linear(
            torch.nn.functional.linear(x if xd is None else xd, A), B) * 2.0
    grads = torch.autograd.grad(y, leaves, g, retain_graph=True)  # the dropout node is shared
    ref_grads = torch.autograd.grad(ref, leaves, g)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype is None else dict(atol=0.1, rtol=0.02)  # bf16 roundings differ
    assert y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, **tol)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)
