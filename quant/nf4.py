"""NF4 4-bit block quantization with double quantization, byte-compatible with bitsandbytes.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", section 3:
  NF4 (eq. 4): 16 values q_i placed at the quantiles of N(0, 1), normalised to [-1, 1], with an exact 0.
  Block-wise absmax quantization (eq. 1): per block of `blocksize` weights, c = absmax(block),
      code = argmin_i |x / c - q_i|,     dequant: x' = q[code] * c.
  Double quantization (eq. 6): the fp32 absmax constants c are themselves quantized to 8 bits in blocks of
      256 (after subtracting their mean), cutting the overhead from 32/64 = 0.5 to 8/64 + 32/(64*256) = 0.127
      bits per parameter.

Layout (bitsandbytes 0.50.2, see docs/quant.md): the tensor is flattened row-major and split into blocks
(the last block may be partial); two 4-bit codes per byte, the EVEN element in the HIGH nibble; odd lengths are
padded with code 7 (the value 0.0). Everything here is vectorised torch and runs on any device: it is the CPU
implementation and the reference the CUDA kernel (quant/csrc/nf4_dequant.cu) is tested against.
"""
import json
import math
from dataclasses import dataclass

import torch

# The 16 NF4 values, as bitsandbytes hard-codes them (recomputing from normal quantiles differs by ~1e-7).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
# code = number of midpoints strictly below the scaled value (torch.bucketize, right=False) == nearest value
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
# byte -> (value of the high nibble, value of the low nibble): one gather dequantizes two weights
NF4_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)  # (256, 2)
NESTED_BLOCKSIZE = 256
BLOCKSIZES = tuple(2 ** i for i in range(5, 13))  # 32 .. 4096, the sizes bitsandbytes accepts
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
    Quantization"): sign, a run of zero bits giving the decimal exponent, then a linear fraction. 256 sorted fp32
    values in [-0.993, 1]. Built exactly like `bitsandbytes.functional.create_dynamic_map()`."""
    data = []
    for i in range(7):  # exponent 10^(i-6); 2^i fraction values at that exponent, both signs
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        # the product is rounded in fp32 (a tensor op), as in bitsandbytes
        data += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_CODE = dynamic_map()


@dataclass
class NF4State:
    """Everything needed besides the packed bytes to dequantize.

    absmax: fp32 (n_blocks,) or, with double quantization, uint8 codes into DYNAMIC_CODE (n_blocks,), rebuilt as
    DYNAMIC_CODE[absmax[j]] * nested_absmax[j // 256] + nested_offset."""
    absmax: torch.Tensor
    blocksize: int
    shape: tuple
    dtype: torch.dtype                        # dtype of the original weight (what dequantize returns by default)
    nested_absmax: torch.Tensor | None = None  # fp32 (ceil(n_blocks / 256),)
    nested_offset: float | torch.Tensor | None = None  # mean of the fp32 absmax before nested quantization
    quant_type: str = "nf4"

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block fp32 scales (rebuilt from the 8-bit codes with double quantization)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_absmax(self.absmax, self.nested_absmax, self.nested_offset)

    def to(self, device):
        nested = self.nested_absmax.to(device) if self.double_quant else None
        return NF4State(self.absmax.to(device), self.blocksize, self.shape, self.dtype, nested, self.nested_offset,
                        self.quant_type)


def check_args(blocksize: int, quant_type: str = "nf4"):
    if quant_type != "nf4":
        raise ValueError(f"quant_type {quant_type!r} is not supported (only 'nf4'; bitsandbytes' fp4 is not "
                         f"implemented)")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} must be a power of two between 32 and 4096")


def _blockwise_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat fp32 (n,) -> (absmax (n_blocks,), x / absmax clamped to [-1, 1] (n,)).

    Bit-for-bit like bitsandbytes: full blocks multiply by the fp32 reciprocal 1/absmax, the partial last block
    DIVIDES by its absmax (the two round differently), and an all-zero block scales by 1e-38 instead of 0.
    The returned absmax is not clamped (bitsandbytes' 4-bit path stores the partial block's clamped: caller)."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)  # (full_blocks,)
    scaled = (flat[:full].view(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)
    if full < n:
        am = flat[full:].abs().amax()
        absmax = torch.cat([absmax, am[None]])
        scaled = torch.cat([scaled, flat[full:] / am.clamp(min=1e-38)])
    return absmax, scaled.clamp(-1, 1)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Double quantization: fp32 absmax (m,) -> (uint8 codes (m,), nested_absmax fp32 (ceil(m/256),), offset).

    Each code is the EXACT nearest DYNAMIC_CODE entry to (absmax - offset) / nested_absmax (ties -> lower code).
    bitsandbytes' CPU quantizer (a vectorised approximate binary search) picks the second-nearest entry for about
    1 value in 1500; both dequantize with the same formula (docs/quant.md)."""
    offset = absmax.mean()
    c = absmax - offset
    nested, scaled = _blockwise_scale(c, NESTED_BLOCKSIZE)
    code = DYNAMIC_CODE.to(absmax.device)
    hi = torch.searchsorted(code, scaled).clamp(1, 255)       # first entry >= s
    lo = hi - 1
    pick_hi = (code[hi] - scaled).abs() < (scaled - code[lo]).abs()
    return torch.where(pick_hi, hi, lo).to(torch.uint8), nested, offset.item()


def dequantize_absmax(q: torch.Tensor, nested_absmax: torch.Tensor, offset) -> torch.Tensor:
    """uint8 codes (m,) -> fp32 absmax: DYNAMIC_CODE[q] * nested_absmax[j // 256] + offset (two fp32 roundings)."""
    m, nb = q.numel(), nested_absmax.numel()
    vals = DYNAMIC_CODE.to(q.device)[q.long()]                          # (m,)
    vals = torch.nn.functional.pad(vals, (0, nb * NESTED_BLOCKSIZE - m)).view(nb, NESTED_BLOCKSIZE)
    vals = (vals * nested_absmax[:, None]).view(-1)[:m]                # one rounding ...
    return vals + torch.as_tensor(offset, dtype=torch.float32, device=q.device)  # ... and another


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 quant_type: str = "nf4") -> tuple[torch.Tensor, NF4State]:
    """w (any shape, fp32/bf16/fp16) -> (packed uint8 ((n + 1) // 2, 1), NF4State)."""
    check_args(blocksize, quant_type)
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize_nf4: dtype {w.dtype} is not supported (float32, bfloat16, float16)")
    flat = w.detach().reshape(-1).float()                         # (n,)
    absmax, scaled = _blockwise_scale(flat, blocksize)
    if flat.numel() % blocksize:  # bitsandbytes stores a zero partial block's absmax as 1e-38
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    if scaled.numel() % 2:  # odd length: pad with 0.0, which quantizes to code 7
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, NF4_MIDPOINTS.to(w.device), out_int32=True).to(torch.uint8)  # (n_even,)
    packed = ((q[0::2] << 4) | q[1::2])[:, None]                 # even element in the high nibble
    state = NF4State(absmax, blocksize, tuple(w.shape), w.dtype)
    if double_quant:
        state.absmax, state.nested_absmax, state.nested_offset = quantize_absmax(absmax)
    return packed, state


def as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """Packed data stored as any dtype (bitsandbytes' quant_storage) -> its flat uint8 bytes."""
    return packed.contiguous().view(-1).view(torch.uint8)


def check_state(packed: torch.Tensor, state: NF4State, source: str = "NF4 state"):
    """One-line errors when the packed bytes, absmax and shape do not belong together."""
    check_args(state.blocksize, state.quant_type)
    n, nbytes = state.numel, packed.numel() * packed.element_size()
    if nbytes != (n + 1) // 2:
        raise ValueError(f"{source}: packed data has {nbytes} bytes but shape {list(state.shape)} needs "
                         f"{(n + 1) // 2}")
    n_blocks = -(-n // state.blocksize)
    if state.absmax.numel() != n_blocks:
        raise ValueError(f"{source}: absmax has {state.absmax.numel()} values but shape {list(state.shape)} with "
                         f"blocksize {state.blocksize} needs {n_blocks}")
    if state.double_quant:
        if state.absmax.dtype != torch.uint8 or state.nested_offset is None:
            raise ValueError(f"{source}: double-quantized absmax must be uint8 with a nested offset")
        if state.nested_absmax.numel() != -(-n_blocks // NESTED_BLOCKSIZE):
            raise ValueError(f"{source}: nested_absmax has {state.nested_absmax.numel()} values, expected "
                             f"{-(-n_blocks // NESTED_BLOCKSIZE)}")
    elif state.absmax.dtype != torch.float32:
        raise ValueError(f"{source}: absmax must be float32 (got {state.absmax.dtype}) without double quant")


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of quantize_nf4: NF4_CODE[code] * absmax in fp32, then one cast to `dtype` (default state.dtype).

    Vectorised with a 256-entry byte -> value-pair table: one gather yields both weights of a byte."""
    check_state(packed, state)
    dtype = dtype or state.dtype
    n, bs = state.numel, state.blocksize
    absmax = state.absmax_fp32()                                       # (n_blocks,)
    table = NF4_PAIRS.to(packed.device)
    vals = torch.index_select(table, 0, as_bytes(packed).int()).view(-1)  # (2 * n_bytes,) fp32
    pad = absmax.numel() * bs - vals.numel()
    if pad > 0:  # partial last block: pad to whole blocks so one broadcast multiply covers everything
        vals = torch.nn.functional.pad(vals, (0, pad))
    out = vals.view(-1, bs).mul_(absmax[:, None])                      # (n_blocks, bs) fp32, in place
    return out.view(-1)[:n].to(dtype).view(state.shape)


# --- bitsandbytes' serialised layout of one 4-bit weight `<p>.weight` (what transformers saves) -------------
QS_SUFFIX = "weight.quant_state.bitsandbytes__nf4"  # uint8 bytes of a JSON with the non-tensor fields


def to_bnb_tensors(packed: torch.Tensor, state: NF4State) -> dict[str, torch.Tensor]:
    """(packed, state) -> {"weight": ..., "weight.absmax": ..., ...}: the keys under a module's prefix."""
    meta = {"quant_type": state.quant_type, "blocksize": state.blocksize,
            "dtype": str(state.dtype).removeprefix("torch."), "shape": list(state.shape)}
    # the codebooks are cloned: safetensors refuses tensors that share memory
    out = {"weight": packed, "weight.absmax": state.absmax, "weight.quant_map": NF4_CODE.clone().to(packed.device)}
    if state.double_quant:
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                    nested_offset=float(state.nested_offset))
        out.update({"weight.nested_absmax": state.nested_absmax,
                    "weight.nested_quant_map": DYNAMIC_CODE.clone().to(packed.device)})
    out[QS_SUFFIX] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


def from_bnb_tensors(t: dict[str, torch.Tensor], source: str) -> tuple[torch.Tensor, NF4State]:
    """Inverse of to_bnb_tensors (also reads files written by bitsandbytes); one-line errors naming `source`."""
    qs = [k for k in t if "quant_state." in k]
    if qs != [QS_SUFFIX]:
        raise ValueError(f"{source}: expected one quant_state key {QS_SUFFIX!r}, found {qs or 'none'} "
                         f"(only bitsandbytes nf4 is supported)")
    try:
        meta = json.loads(bytes(t[QS_SUFFIX].view(torch.uint8).tolist()).decode())
        shape, bs, dtype = tuple(meta["shape"]), int(meta["blocksize"]), getattr(torch, meta["dtype"])
        quant_type = meta["quant_type"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{source}.{QS_SUFFIX}: corrupt quant_state JSON ({type(e).__name__}: {e})") from None
    check_args(bs, quant_type)
    for k in ("weight", "weight.absmax"):
        if k not in t:
            raise ValueError(f"{source}: missing tensor {k}")
    if "weight.quant_map" in t and not torch.equal(t["weight.quant_map"].float().cpu(), NF4_CODE):
        raise ValueError(f"{source}.weight.quant_map: not the NF4 codebook")
    state = NF4State(t["weight.absmax"], bs, shape, dtype)
    if "nested_offset" in meta or "weight.nested_absmax" in t:
        if "weight.nested_absmax" not in t or "nested_offset" not in meta:
            raise ValueError(f"{source}: double quant needs weight.nested_absmax and nested_offset")
        if meta.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE or (
                "weight.nested_quant_map" in t and not torch.equal(t["weight.nested_quant_map"].cpu(), DYNAMIC_CODE)):
            raise ValueError(f"{source}: nested quantization is not bitsandbytes' 8-bit dynamic map in blocks of 256")
        state.nested_absmax, state.nested_offset = t["weight.nested_absmax"], float(meta["nested_offset"])
    packed = as_bytes(t["weight"])[:, None]
    check_state(packed, state, source)
    return packed, state
