"""QLoRA == LoRA on the dequantized model (same math, exact), streaming quantization at load, learning, merging."""
import gc

import pytest
import torch
import torch.nn.functional as F

import model as M
import peft
from peft.lora import LoraConfig
from quant import checkpoint, qlora
from quant.linear import NF4Linear
from quant.qlora import QLoraLinear

CFG = M.ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rms_norm_eps=1e-6)
LORA = LoraConfig(r=4, alpha=8, targets="all-linear")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qlora") / "fp"
    M.save_pretrained(M.Transformer(CFG).init_weights(0.05, seed=0), d)
    return d


def _loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _pair(hf_dir):
    """QLoRA model, and a plain LoRA model on the QLoRA model's dequantized weights, with identical adapters."""
    torch.manual_seed(0)
    q = qlora.load_qlora(hf_dir, LORA)
    dense = M.load_pretrained(hf_dir)
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, QLoraLinear):
                dense.get_submodule(name).weight.copy_(m.dequantize(torch.float32))
    torch.manual_seed(0)
    dense = peft.apply(dense, LORA)
    with torch.no_grad():  # non-zero B so that A gets a gradient too
        g = torch.Generator().manual_seed(1)
        for name, m in q.named_modules():
            if isinstance(m, QLoraLinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
                dense.get_submodule(name).lora_B.weight.copy_(m.lora_B.weight)
    return q, dense


def test_qlora_loss_and_grads_equal_lora_on_dequantized(hf_dir):
    q, dense = _pair(hf_dir)
    n_q = sum(isinstance(m, QLoraLinear) for m in q.modules())
    assert n_q == 14 and not isinstance(q.lm_head, (NF4Linear, QLoraLinear))
    assert peft.core.export_state(q).keys() == peft.core.export_state(dense).keys()
    ids = torch.randint(0, CFG.vocab_size, (3, 17), generator=torch.Generator().manual_seed(2))
    lq, ld = _loss(q, ids), _loss(dense, ids)
    assert torch.equal(lq, ld)
    lq.backward()
    ld.backward()
    pq, pd = peft.core.adapter_parameters(q), peft.core.adapter_parameters(dense)
    assert pq.keys() == pd.keys() and len(pq) == 28
    for k in pq:
        assert pq[k].grad is not None and torch.equal(pq[k].grad, pd[k].grad), k
    assert all(not p.requires_grad for n, p in q.named_parameters() if n not in pq)


def test_qlora_learns_a_fixed_batch(hf_dir):
    torch.manual_seed(0)
    model = qlora.load_qlora(hf_dir, LoraConfig(r=8, alpha=16, targets="all-linear")).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, CFG.vocab_size, (4, 24), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(40):
        loss = _loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # 4.66 -> 1.90 when written


def test_merge_into_dequantized_base(hf_dir, tmp_path):
    q, _ = _pair(hf_dir)
    ids = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = q(ids)
    peft.save_adapter(q, tmp_path / "adapter")  # HF PEFT format; reloads onto a fresh NF4 model
    again = qlora.load_adapter(checkpoint.load_nf4(hf_dir, quantize=True), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again(ids), ref)
    with pytest.raises(RuntimeError, match="merging into 4-bit weights"):
        peft.merge(q)
    merged = qlora.merge_dequantized(q, torch.float32)
    assert not any(isinstance(m, (NF4Linear, QLoraLinear)) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), ref, rtol=1e-5, atol=1e-5)  # W x + s B (A x) vs (W + s B A) x
    M.save_pretrained(merged, tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(M.load_pretrained(tmp_path / "merged")(ids), merged(ids))


def test_quantize_at_load_streams_one_weight_at_a_time(hf_dir, monkeypatch):
    """While each weight is quantized, no other full-precision linear weight is alive (the model is on meta)."""
    shapes = {(96, 64), (64, 96), (64, 64), (32, 64)}
    alive = []
    real = checkpoint.quantize_nf4

    def spy(w, *a, **kw):
        gc.collect()
        alive.append(sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter) and not o.is_meta
                         and o.is_floating_point() and tuple(o.shape) in shapes))
        return real(w, *a, **kw)
    monkeypatch.setattr(checkpoint, "quantize_nf4", spy)
    checkpoint.load_nf4(hf_dir, quantize=True)
    assert len(alive) == 14 and max(alive) == 1, alive
