"""GGML's Q8_0 and Q4_0 block quantization (llama.cpp's ggml-quants.c), byte-compatible with the `gguf` package.

Both are symmetric absmax block codes over 32 consecutive weights of a row (GGUF rows are the input dimension
of a linear layer, so `in_features` must be a multiple of 32), with one fp16 scale `d` per block:

  Q8_0:  d = absmax(block) / 127,   q_i = roundf(x_i / d)  in [-127, 127]   (int8),   x'_i = d * q_i
  Q4_0:  m = the block's element of largest |x| (its sign kept, the first one on ties),
         d = m / -8,   q_i = min(15, trunc(x_i / d + 8.5))  in [0, 15],             x'_i = d * (q_i - 8)

`x_i / d` is computed as `x_i * (1 / d)` in fp32 and `roundf` rounds half away from zero, both as ggml's
reference C code does; an all-zero block has d = 0 and codes 0 (Q8_0) / 8 (Q4_0). Dividing by -m/8 rather
than |m|/8 maps the extreme value to code 0 exactly, so Q4_0 uses all 16 codes on the side of the extreme
and 15 on the other (the 4-bit analogue of NF4's asymmetric code).

Layout, per block (little-endian), blocks in row-major order of the (rows, in_features) matrix:

  Q8_0 (34 bytes = 8.5 bits/weight):  [d: fp16, 2 bytes] [q_0 .. q_31: int8, 32 bytes]
  Q4_0 (18 bytes = 4.5 bits/weight):  [d: fp16, 2 bytes] [16 bytes: byte j = q_j | q_{j+16} << 4]

Q4_0 puts the block's first half in the LOW nibbles and its second half in the high nibbles (unlike NF4's
bitsandbytes layout, which pairs neighbours, even element high). Returned as uint8 arrays of shape
(rows, in_features / 32 * bytes_per_block): what `gguf.GGUFWriter.add_tensor(..., raw_dtype=...)` takes.
Pure torch, vectorised; tests compare the bytes with `gguf.quants.quantize`.
"""
import torch

BLOCK = 32
BYTES = {"q8_0": 2 + BLOCK, "q4_0": 2 + BLOCK // 2}


def _blocks(w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"GGML block quantization needs a 2-D tensor with rows of a multiple of {BLOCK} values, "
                         f"got shape {tuple(w.shape)}")
    return w.detach().to("cpu", torch.float32).reshape(-1, BLOCK)         # (n_blocks, 32)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), exactly: a - floor(a) is exact in fp32, so no a + 0.5 double rounding."""
    a = x.abs()
    f = a.floor()
    return torch.sign(x) * (f + (a - f >= 0.5).float())


def _pack(d: torch.Tensor, codes: torch.Tensor, rows: int) -> torch.Tensor:
    """[fp16 d | code bytes] per block -> (rows, bytes per row) uint8."""
    d16 = d.to(torch.float16).view(torch.uint8).reshape(-1, 2)           # (n_blocks, 2) little-endian
    return torch.cat([d16, codes], dim=1).reshape(rows, -1)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """(rows, in) float -> (rows, in / 32 * 34) uint8 Q8_0 blocks."""
    b = _blocks(w)
    d = b.abs().amax(dim=1, keepdim=True) / 127                          # (n_blocks, 1)
    q = _roundf(b * _inverse(d)).to(torch.int8).view(torch.uint8)        # (n_blocks, 32)
    return _pack(d, q, w.shape[0])


def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    """(rows, in) float -> (rows, in / 32 * 18) uint8 Q4_0 blocks."""
    b = _blocks(w)
    m = b.gather(1, b.abs().argmax(dim=1, keepdim=True))                # (n_blocks, 1) signed extreme
    d = m / -8
    q = torch.trunc(b * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)  # (n_blocks, 32)
    q = q[:, :BLOCK // 2] | (q[:, BLOCK // 2:] << 4)                     # (n_blocks, 16)
    return _pack(d, q, w.shape[0])


def dequantize(data: torch.Tensor, kind: str, in_features: int) -> torch.Tensor:
    """Q8_0 / Q4_0 bytes (rows, ...) -> (rows, in_features) fp32."""
    b = data.reshape(-1, BYTES[kind])
    d = b[:, :2].contiguous().view(torch.float16).float()                # (n_blocks, 1)
    if kind == "q8_0":
        q = b[:, 2:].contiguous().view(torch.int8).float()
    else:
        q = torch.cat([b[:, 2:] & 0x0F, b[:, 2:] >> 4], dim=1).float() - 8
    return (d * q).reshape(-1, in_features)


QUANTIZE = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0}
