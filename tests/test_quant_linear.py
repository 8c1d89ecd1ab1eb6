"""NF4Linear == a dense linear on the dequantized weight, forward and input gradient, without saving the weight."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.linear import NF4Linear, quantize_model
from quant.nf4 import dequantize_nf4, quantize_nf4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_input_grad_equal_dense(dtype, double_quant, bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=bias)
    layer = NF4Linear.from_linear(lin, blocksize=64, double_quant=double_quant)
    w = dequantize_nf4(*quantize_nf4(lin.weight, 64, double_quant), dtype=dtype)  # (40, 96)
    b = lin.bias.detach().to(dtype) if bias else None
    x = torch.randn(3, 5, 96, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), F.linear(x_ref, w, b)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)


def test_backward_saves_no_weight_sized_tensor():
    layer = NF4Linear.from_linear(nn.Linear(256, 128))
    x = torch.randn(2, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    assert all(s.numel() < 128 * 256 for s in saved), saved
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert not any(p.requires_grad for p in layer.parameters())


def test_bytes_per_param_with_double_quant():
    layer = NF4Linear.from_linear(nn.Linear(1024, 1024, bias=False), double_quant=True)
    nbytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert 0.515 < nbytes / 1024 ** 2 < 0.52  # 0.5 codes + 1/64 absmax + 4/16384 nested absmax + offset
    plain = NF4Linear.from_linear(nn.Linear(1024, 1024, bias=False), double_quant=False)
    assert sum(b.numel() * b.element_size() for b in plain.buffers()) / 1024 ** 2 == 0.5 + 4 / 64


def test_quantize_model_and_state_dict_roundtrip():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    quantize_model(model, skip=())
    assert all(isinstance(m, NF4Linear) for m in (model[0], model[2]))
    x = torch.randn(4, 32)
    copy = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    quantize_model(copy, skip=())
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy(x), model(x))


def test_bad_shape():
    packed, state = quantize_nf4(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match=r"NF4Linear: weight shape \[4, 4, 4\] is not 2-D"):
        NF4Linear(packed, state)
