"""The few hand-written pieces under the model's training step: SwiGLU's product with a lean backward, selective
recomputation of saved activations, the chunked language-model loss, and where matrix products run for bf16/fp16
on hardware without them."""
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

try:  # torch >= 2.9: FlashAttention's variable-length kernel (CUDA)
    from torch.nn.attention.varlen import varlen_attn as _varlen
except ImportError:
    _varlen = None


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


def resolve_precision(name: str, device) -> str:
    """train.py's --precision for a device: "default" is bf16 autocast on CUDA (where fp32 training wastes the
    tensor cores) and fp32 elsewhere; "auto" is bf16 wherever native_half_gemm; the others as given."""
    if name == "default":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if name == "auto":
        return "bf16" if native_half_gemm(device) else "fp32"
    return name


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
    """Causal (mask None), packed (mask a Segments) or masked SDPA with grouped K/V heads; `scale` defaults to
    head_dim^-1/2. mask None with fewer queries T than keys S (a KV cache, prefix keys) is causal aligned to the
    last key (query t sees keys up to S - T + t: `causal_lower_right`, which the fused CUDA kernels take; T = 1 is
    no mask at all). Under bf16/fp16 autocast on a CPU without half-precision matrix units, the kernel runs in fp32
    on rounded operands (see gemm_dtype) and the output is rounded back, instead of the CPU's slower bf16 kernel
    (docs/train.md). softcap: Gemma 2's soft-capped logits c * tanh(q.k / c), which SDPA can't do: the scores are
    formed explicitly then (HF's eager path, fp32 softmax)."""
    dev = q.device
    amp = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
    if softcap is not None:
        return _softcapped(q, k, v, mask, scale, softcap)
    if amp is not None and gemm_dtype(amp, dev) != amp:
        with torch.autocast(dev.type, enabled=False):
            q, k, v = (gemm_operand(t, amp) for t in (q, k, v))
            return attention(q, k, v, mask, scale).to(amp)
    if isinstance(mask, Segments):
        return _packed(q, k, v, mask, scale)
    gqa = k.shape[1] != q.shape[1]
    T, S = q.shape[2], k.shape[2]
    if mask is not None and gqa and dev.type == "cuda":
        # CUDA's memory-efficient kernel (the one that takes a mask) has no grouped heads: repeat them, or SDPA
        # falls back to its math kernel and its (B, nh, T, S) fp32 scores
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        gqa = False
    if mask is None and 1 < T < S:
        mask = causal_lower_right(T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T == S, scale=scale,
                                          enable_gqa=gqa)


# On a CPU, each SDPA call has a fixed cost (thread dispatch, buffers: several ms forward + backward for SmolLM2's
# heads) while the masked kernel's work grows as T^2. The per-example loop pays when the query-key pairs it avoids,
# B T^2 - sum(n_i^2), come to at least this many per call it makes (bench/bench_attention.py: the dense mask wins at
# ~50k pairs avoided per call, the loop from ~100k; README: Benchmarks).
LOOP_PAIRS_PER_CALL = 75_000


class Segments:
    """Packed rows without their (B, 1, T, T) block-diagonal mask: row b holds examples of lengths lens[b] back to
    back (summing to T), each attending causally to itself only (a trailing run of padding is one more "example":
    its outputs carry no labels; data.collate gives them as batch["segments"]). As FlashAttention-2's varlen
    kernels take them: cu_seqlens, the offsets of the examples in the flattened (B*T) token stream."""

    def __init__(self, lens: list[list[int]]):
        self.lens, self.T, self.max_len = lens, sum(lens[0]), max(max(r) for r in lens)
        self.calls = sum(map(len, lens))                                       # examples: SDPA calls of the loop
        self.avoided = len(lens) * self.T ** 2 - sum(n * n for r in lens for n in r)  # pairs the loop skips
        self._cu, self._dense = {}, {}

    def loop_pays(self) -> bool:
        """Whether the exact per-example loop beats one masked SDPA call on a CPU (LOOP_PAIRS_PER_CALL)."""
        return self.avoided >= LOOP_PAIRS_PER_CALL * self.calls

    def cu_seqlens(self, device) -> torch.Tensor:
        """(n_examples + 1,) int32 offsets, built once per device."""
        if device not in self._cu:
            flat = torch.tensor([0] + [n for row in self.lens for n in row]).cumsum(0)
            self._cu[device] = flat.to(device=device, dtype=torch.int32)
        return self._cu[device]

    def dense(self, device) -> torch.Tensor:
        """The (B, 1, T, T) bool block-diagonal causal mask (True = attend), built once per device (every layer
        of a forward shares it)."""
        device = torch.device(device)
        if device not in self._dense:
            seg = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in self.lens], device=device)
            causal = torch.ones(self.T, self.T, dtype=torch.bool, device=device).tril()
            self._dense[device] = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
        return self._dense[device]


def _packed(q, k, v, segs: Segments, scale):
    """Block-diagonal causal attention of packed rows. CUDA, bf16/fp16: one varlen FlashAttention call over the
    flattened rows (torch.nn.attention.varlen, GQA native). Elsewhere, exact: causal SDPA per example, which does
    sum(n_i^2) work instead of the mask's T^2 (and on CPU takes the fused kernel too); but on a CPU, when the
    examples are short (Segments.loop_pays), one SDPA call with the dense mask, whose fixed cost is paid once."""
    B, H, T, hd = q.shape
    gqa = k.shape[1] != H
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _varlen is not None:
        cu = segs.cu_seqlens(q.device)
        qf, kf, vf = (t.transpose(1, 2).reshape(B * T, t.shape[1], hd) for t in (q, k, v))  # (B*T, heads, hd)
        y = _varlen(qf, kf, vf, cu, cu, segs.max_len, segs.max_len, scale=scale, window_size=(-1, 0), enable_gqa=gqa)
        return y.view(B, T, H, hd).transpose(1, 2)                             # (B, nh, T, hd)
    if q.device.type == "cpu" and not segs.loop_pays():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=segs.dense(q.device), scale=scale, enable_gqa=gqa)
    rows = []
    # unbind / split, not slices: their backward is one stack / cat, where each slice's would be a zero-filled
    # gradient of the whole tensor
    for qb, kb, vb, lens in zip(q.unbind(0), k.unbind(0), v.unbind(0), segs.lens):  # (heads, T, hd) each
        out = [F.scaled_dot_product_attention(qe[None], ke[None], ve[None], is_causal=True, scale=scale,
                                              enable_gqa=gqa)
               for qe, ke, ve in zip(qb.split(lens, 1), kb.split(lens, 1), vb.split(lens, 1))]
        rows.append(torch.cat(out, dim=2))
    return torch.cat(rows, dim=0)                                              # (B, nh, T, hd)


def _softcapped(q, k, v, mask, scale, cap):
    """softmax(mask(c tanh(q k^T s / c))) v with the (B, nh, T, S) scores formed explicitly."""
    T, S = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    if isinstance(mask, Segments):
        mask = mask.dense(q.device)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)     # (B, nh, S, hd)
    scores = (q @ k.transpose(2, 3)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / cap) * cap
    if mask is None:  # plain causal: query i (at position S - T + i) sees keys up to it
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v


def ce_chunk(device) -> int:
    """ChunkedCE's rows per (rows, vocab) logits block: 256 on a CPU, where the loss is memory-bound and a block
    that stays in cache is fastest; 4096 on a GPU, where larger GEMMs fill the device (4096 x 49152 fp32 logits:
    0.8 GB)."""
    return 256 if torch.device(device).type == "cpu" else 4096


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
