"""The few hand-written pieces under the model's training step: SwiGLU's product with a lean backward, selective
recomputation of saved activations, the chunked language-model loss, and where matrix products run for bf16/fp16
on hardware without them."""
import functools

import torch
import torch.nn.functional as F


@functools.cache
def _cpu_half_units() -> bool:
    try:  # private torch helpers (present since torch 2.3); without them, assume no bf16 matrix unit
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    except AttributeError:
        return False


def native_half_gemm(device) -> bool:
    """Whether `device` multiplies bf16/fp16 matrices in hardware: CUDA (any accelerator: only CPUs are probed),
    or a CPU with AMX or AVX512-BF16 instructions. Elsewhere torch emulates half-precision GEMMs, several times
    slower than fp32 ones (docs/train.md), so bf16 autocast does not pay there. The project's one CPU-feature
    probe: whatever picks a precision or a matmul peak asks it."""
    return torch.device(device).type != "cpu" or _cpu_half_units()


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a `dtype` matrix product runs in. Where half-precision GEMMs are emulated (not
    native_half_gemm), the half-precision operands are multiplied in fp32 instead. That computes what a bf16/fp16
    GEMM computes (the product of two such numbers is exact in fp32, and the GEMM accumulates in fp32); the caller
    rounds the result back to `dtype`."""
    if dtype in (torch.bfloat16, torch.float16) and not native_half_gemm(device):
        return torch.float32
    return dtype


def gemm_operand(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t rounded to `dtype`, held in the dtype the product runs in (gemm_dtype)."""
    return t.to(dtype).to(gemm_dtype(dtype, t.device))


def attention(q, k, v, mask, scale: float | None = None, softcap: float | None = None):
    """Causal (mask None) or masked SDPA with grouped K/V heads; `scale` defaults to head_dim^-1/2. Under bf16/fp16
    autocast on a CPU without half-precision matrix units, the kernel runs in fp32 on rounded operands (see
    gemm_dtype) and the output is rounded back, instead of the CPU's slower bf16 kernel (docs/train.md).
    softcap: Gemma 2's soft-capped logits c * tanh(q.k / c), which SDPA can't do: the scores are formed
    explicitly then (HF's eager path, fp32 softmax)."""
    dev = q.device
    amp = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
    gqa = k.shape[1] != q.shape[1]
    if softcap is not None:
        return _softcapped(q, k, v, mask, scale, softcap)
    if amp is not None and gemm_dtype(amp, dev) != amp:
        with torch.autocast(dev.type, enabled=False):
            q, k, v = (gemm_operand(t, amp) for t in (q, k, v))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                                  enable_gqa=gqa).to(amp)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=gqa)


def _softcapped(q, k, v, mask, scale, cap):
    """softmax(mask(c tanh(q k^T s / c))) v with the (B, nh, T, S) scores formed explicitly."""
    T, S = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)     # (B, nh, S, hd)
    scores = (q @ k.transpose(2, 3)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / cap) * cap
    if mask is None:  # plain causal: query i (at position S - T + i) sees keys up to it
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v


class ChunkedCE(torch.autograd.Function):
    """The language-model loss sum_i CE(W h_i, y_i) over N selected positions, in chunks. The gradient of each chunk,
    dL/dlogits = softmax(logits) - onehot(y), is turned into dL/dh (and dL/dW) right away, so only (N, D) and
    (V, D) tensors are kept for backward, never (N, V) logits. Operands are rounded to `dtype` (the autocast dtype)
    and multiplied where gemm_dtype says (fp32 on a CPU without bf16 units); logits are fp32."""

    @staticmethod
    def forward(ctx, h, w, y, chunk: int, dtype):
        with torch.autocast(h.device.type, enabled=False):
            wc = gemm_operand(w, dtype)                                # rounded to dtype, see model.ops
            gh = torch.empty_like(h)                                   # (N, D)
            gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            for i in range(0, h.shape[0], chunk):
                hc, yc = gemm_operand(h[i:i + chunk], dtype), y[i:i + chunk]
                logits = (hc @ wc.T).float()                            # (n, V)
                lse = torch.logsumexp(logits, -1)                       # (n,)
                loss += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
                g = logits.sub_(lse[:, None]).exp_()                    # softmax, in place
                g[torch.arange(len(yc), device=g.device), yc] -= 1.0
                g = gemm_operand(g, dtype)
                gh[i:i + chunk] = (g @ wc).to(h.dtype)
                if gw is not None:
                    gw += (g.T @ hc).float()
        ctx.save_for_backward(gh, gw)
        ctx.w_dtype = w.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw = ctx.saved_tensors
        return gh * grad_out, None if gw is None else (gw * grad_out).to(ctx.w_dtype), None, None, None


class SiluMul(torch.autograd.Function):
    """SwiGLU's h = silu(g) * u (Shazeer 2020), saving only g and u for backward: autograd on the two ops
    would also keep silu(g), one more (B, T, intermediate) tensor per layer. With s = sigmoid(g):
        dh/du = g s,   dh/dg = u s (1 + g (1 - s))"""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        # aten's fused silu_backward computes dh_g * s (1 + g (1 - s)) in one pass (in fp32 for bf16/fp16)
        dg = torch.ops.aten.silu_backward(dh * u, g) if ctx.needs_input_grad[0] else None
        return dg, dh * F.silu(g) if ctx.needs_input_grad[1] else None


class RecomputeSaved(torch.autograd.graph.saved_tensors_hooks):
    """Selective activation recomputation (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models"): inside this context, an op that saves `out` for backward keeps the recipe
    fn(*inputs) instead, and `out` is recomputed (bit-identically: same ops, same autocast state) when backward
    needs it. It pays when the inputs are kept for backward anyway (RMSNorm keeps x, SiluMul keeps g and u), so
    a (B, T, D) or (B, T, intermediate) tensor per use is saved for a cheap elementwise pass."""

    def __init__(self, out, fn, *inputs, enabled: bool = True):
        dev = out.device.type
        amp = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        # detached: a graph-connected input would make a cycle (input -> graph -> this hook -> input) that
        # passes through C++ autograd nodes, which Python's gc cannot break, leaking a graph never backpropagated
        inputs = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in inputs)
        # only out's address, never `out` itself: autograd keeps the hooks as long as what they saved
        key = (out.data_ptr(), out.numel(), out.dtype) if enabled and torch.is_grad_enabled() \
            and out.is_contiguous() else None

        def pack(t):
            if key == (t.data_ptr(), t.numel(), t.dtype) and t.is_contiguous():
                return t.shape                        # `out` or a contiguous view of it: keep the recipe only
            # anything else as is, but detached: a node's own saved output returned with its grad_fn would
            # make the same kind of uncollectable cycle (node -> saved value -> grad_fn = node)
            return t.detach()

        def unpack(t):
            if isinstance(t, torch.Size):
                with torch.no_grad(), torch.autocast(dev, dtype=amp[1], enabled=amp[0]):
                    return fn(*inputs).view(t)
            return t

        super().__init__(pack, unpack)
