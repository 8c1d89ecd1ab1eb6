"""Our CUDA NF4 kernel: it compiles with plain nvcc and exports its ctypes launchers (CPU CI, when nvcc exists);
on a GPU it is bit-exact with the torch path (skipped without CUDA)."""
import ctypes
import shutil

import pytest
import torch

from quant import cuda
from quant.nf4 import dequantize_nf4, quantize_nf4

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernel_compiles_and_exports_launchers(tmp_path):
    so = cuda.build("sm_90", tmp_path)
    lib = ctypes.CDLL(str(so))  # the CUDA runtime is linked statically: loads without a GPU
    for name in cuda.LAUNCHERS.values():
        assert getattr(lib, name) is not None


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_kernel_bit_exact_with_torch_path(dtype, double_quant):
    assert cuda.available(), "the kernel did not build on this GPU machine"
    g = torch.Generator(device="cuda").manual_seed(1)
    for shape, bs in [((4096, 4096), 64), ((1001, 333), 32), ((7,), 4096), ((513, 17), 256), ((70000,), 1024)]:
        w = torch.randn(shape, device="cuda", generator=g)
        packed, state = quantize_nf4(w, bs, double_quant)
        out = torch.full(shape, float("nan"), dtype=dtype, device="cuda")  # poisoned: every element must be written
        cuda.kernel_dequantize(packed, state, dtype, out=out)
        ref = dequantize_nf4(packed, state, dtype)
        assert torch.equal(out, ref), (shape, bs)
        # unaligned packed bytes and output take the scalar path
        n = w.numel()
        pbuf = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")
        pbuf[1:] = packed.view(-1)
        obuf = torch.full((n + 1,), float("nan"), dtype=dtype, device="cuda")
        cuda.kernel_dequantize(pbuf[1:], state, dtype, out=obuf[1:])
        assert torch.equal(obuf[1:].view(shape), ref)


def test_cpu_tensors_take_the_torch_path(capsys):
    packed, state = quantize_nf4(torch.randn(33, 65), 64, True)
    assert torch.equal(cuda.dequantize(packed, state, torch.bfloat16), dequantize_nf4(packed, state, torch.bfloat16))
    assert capsys.readouterr().err == ""  # no fallback notice: CPU tensors never want the kernel
