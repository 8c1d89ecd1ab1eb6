"""NF4 quantization vs bitsandbytes 0.50.2 (CPU), run once in a reference subprocess for all cases."""
import json

import pytest
import torch

from quant.nf4 import (DYNAMIC_CODE, NF4_CODE, NF4State, dequantize_absmax, dequantize_nf4, quantize_absmax,
                       quantize_nf4)
from tests.reference import run_reference

# (shape, blocksize, dtype): odd lengths, partial last blocks, every blocksize, 1-D..3-D, all input dtypes
CASES = [((7, 9), 64, "float32"), ((96, 96), 256, "bfloat16"), ((1001,), 32, "float16"), ((3, 5, 77), 4096, "float32"),
         ((33, 65), 128, "bfloat16"), ((1,), 64, "float32"), ((64, 64), 64, "float16"), ((130, 31), 512, "float32"),
         ((5000,), 1024, "bfloat16"), ((2049, 3), 2048, "float32"), ((512, 1000), 32, "float32")]


def _inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    xs = {}
    for i, (shape, bs, dt) in enumerate(CASES):
        x = torch.randn(shape, generator=g) * torch.rand(1, generator=g) * 3
        flat = x.view(-1)
        if flat.numel() >= 2 * bs:
            flat[:bs] = 0                                    # an all-zero block
            mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2        # exact ties between two codes (absmax 1)
            flat[bs:bs + 15], flat[bs + 15] = mids, 1.0
        xs[f"w{i}"] = x.to(getattr(torch, dt))
    return xs


@pytest.fixture(scope="module")
def bnb(tmp_path_factory):
    """bitsandbytes' packed bytes, absmax and nested state for every case, plus its dynamic map."""
    cases = json.dumps([[list(s), bs, dt] for s, bs, dt in CASES])
    out = run_reference(f"""
        import bitsandbytes.functional as F
        x = load_file("in.safetensors")
        out = {{"dynamic": F.create_dynamic_map()}}
        for i, (shape, bs, dt) in enumerate(json.loads('{cases}')):
            w = x[f"w{{i}}"]
            p, s = F.quantize_4bit(w, blocksize=bs, quant_type="nf4")
            out[f"p{{i}}"], out[f"a{{i}}"] = p, s.absmax
            p, s = F.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=True)
            out[f"dp{{i}}"], out[f"da{{i}}"], out[f"dn{{i}}"] = p, s.absmax, s.state2.absmax
            out[f"do{{i}}"] = s.offset.reshape(1)
            # bitsandbytes' own rebuild of the fp32 absmax (C++ dequantize_blockwise, then + offset)
            out[f"dr{{i}}"] = F.dequantize_blockwise(s.absmax, s.state2) + s.offset
        save_file({{k: v.contiguous() for k, v in out.items()}}, "out.safetensors")
    """, tmp_path_factory.mktemp("bnb_nf4"), _inputs())
    return out


def _formula(packed: torch.Tensor, absmax: torch.Tensor, shape, bs: int) -> torch.Tensor:
    """The documented dequantization written independently: high nibble first, fp32 code * fp32 absmax."""
    b = packed.view(-1).long()
    codes = torch.stack([b >> 4, b & 15], dim=1).view(-1)
    n = torch.Size(shape).numel()
    return NF4_CODE[codes[:n]] * absmax.repeat_interleave(bs)[:n]


def test_dynamic_map_matches_bitsandbytes(bnb):
    assert torch.equal(DYNAMIC_CODE, bnb["dynamic"])


@pytest.mark.parametrize("i", range(len(CASES)))
def test_quantize_equals_bitsandbytes(bnb, i):
    w = _inputs()[f"w{i}"]
    packed, state = quantize_nf4(w, CASES[i][1])
    assert packed.dtype == torch.uint8 and packed.shape == bnb[f"p{i}"].shape
    assert torch.equal(packed, bnb[f"p{i}"])
    assert torch.equal(state.absmax, bnb[f"a{i}"])
    assert state.shape == w.shape and state.dtype == w.dtype


def test_double_quant_equals_bitsandbytes_up_to_its_rounding(bnb):
    """Packed bytes, nested absmax and offset are equal. The 8-bit absmax codes are equal except where
    bitsandbytes' approximate CPU search is not the nearest entry: there ours is strictly nearer."""
    mismatches = total = 0
    for i, (shape, bs, dt) in enumerate(CASES):
        w = _inputs()[f"w{i}"]
        packed, state = quantize_nf4(w, bs, double_quant=True)
        assert torch.equal(packed, bnb[f"dp{i}"])
        assert torch.equal(state.nested_absmax, bnb[f"dn{i}"])
        assert state.nested_offset == bnb[f"do{i}"].item()
        absmax = quantize_nf4(w, bs)[1].absmax
        nested = state.nested_absmax.repeat_interleave(256)[:absmax.numel()]
        s = ((absmax - state.nested_offset) / nested.clamp(min=1e-38)).clamp(-1, 1)
        ours, theirs = state.absmax.long(), bnb[f"da{i}"].long()
        diff = ours != theirs
        assert ((DYNAMIC_CODE[ours] - s).abs()[diff] < (DYNAMIC_CODE[theirs] - s).abs()[diff]).all()
        # and everywhere ours is an exact nearest entry
        assert ((DYNAMIC_CODE[ours] - s).abs() <= (DYNAMIC_CODE[:, None] - s).abs().amin(0)).all()
        mismatches, total = mismatches + int(diff.sum()), total + diff.numel()
    assert total > 16000 and mismatches / total < 0.005, (mismatches, total)


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_bitsandbytes_states_bit_exact(bnb, double_quant):
    """Our dequantize of bitsandbytes' own bytes and absmax == the formula, bit for bit, for every dtype."""
    for i, (shape, bs, dt) in enumerate(CASES):
        if double_quant:
            packed, q, nested, off = bnb[f"dp{i}"], bnb[f"da{i}"], bnb[f"dn{i}"], bnb[f"do{i}"].item()
            state = NF4State(q, bs, shape, getattr(torch, dt), nested, off)
            absmax = bnb[f"dr{i}"]
            assert torch.equal(dequantize_absmax(q, nested, off), absmax)  # == bitsandbytes' rebuild
        else:
            packed, absmax = bnb[f"p{i}"], bnb[f"a{i}"]
            state = NF4State(absmax, bs, shape, getattr(torch, dt))
        ref = _formula(packed, absmax, shape, bs).view(shape)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = dequantize_nf4(packed, state, dtype)
            assert out.dtype == dtype and out.shape == torch.Size(shape)
            assert torch.equal(out, ref.to(dtype))
        assert dequantize_nf4(packed, state).dtype == getattr(torch, dt)


def test_packed_bytes_stored_as_other_dtype():
    w = torch.randn(40, 24)
    packed, state = quantize_nf4(w, 64, double_quant=True)
    as_bf16 = packed.view(-1).view(torch.bfloat16)[:, None]  # bitsandbytes' quant_storage=bfloat16
    assert torch.equal(dequantize_nf4(as_bf16, state), dequantize_nf4(packed, state))


def test_roundtrip_error_is_within_half_a_code_step():
    w = torch.randn(300, 70)
    packed, state = quantize_nf4(w, 64)
    err = (dequantize_nf4(packed, state) - w).abs().view(-1)
    absmax = state.absmax.repeat_interleave(64)[:w.numel()]
    gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max()  # largest gap between neighbouring codes
    assert (err <= absmax * gap / 2 + 1e-6).all()


def test_quantize_absmax_roundtrip():
    a = torch.rand(1000) * 0.1
    q, nested, off = quantize_absmax(a)
    assert q.dtype == torch.uint8 and nested.shape == (4,)
    assert (dequantize_absmax(q, nested, off) - a).abs().max() < 0.01 * nested.max()


def test_bad_inputs():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="quant_type 'fp4' is not supported"):
        quantize_nf4(w, 64, quant_type="fp4")
    for bs in (48, 16, 8192):
        with pytest.raises(ValueError, match=f"blocksize {bs} must be a power of two"):
            quantize_nf4(w, bs)
    with pytest.raises(ValueError, match="dtype torch.int64 is not supported"):
        quantize_nf4(torch.ones(4, dtype=torch.long))
    packed, state = quantize_nf4(w, 32, double_quant=True)
    bad = NF4State(state.absmax, 32, (8, 9), torch.float32, state.nested_absmax, state.nested_offset)
    with pytest.raises(ValueError, match=r"packed data has 32 bytes but shape \[8, 9\] needs 36"):
        dequantize_nf4(packed, bad)
    bad = NF4State(state.absmax[:1], 32, (8, 8), torch.float32, state.nested_absmax, state.nested_offset)
    with pytest.raises(ValueError, match="absmax has 1 values but shape"):
        dequantize_nf4(packed, bad)
    bad = NF4State(state.absmax_fp32().half(), 32, (8, 8), torch.float32)
    with pytest.raises(ValueError, match="absmax must be float32"):
        dequantize_nf4(packed, bad)
