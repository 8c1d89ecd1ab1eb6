"""Rotary position embeddings (Su et al. 2021, "RoFormer") and the context-extension scalings of their frequencies,
computed as transformers' modeling_rope_utils does, number for number.

    theta_i = base^(-2i/d)  (d = head_dim * partial_rotary_factor: Phi-3/4 rotate only the first d dimensions)
    q' = q * cos(p theta) + rotate_half(q) * sin(p theta)      (HF "rotate-half" form, pairs i and i + d/2)

Scalings (`rope_scaling` / `rope_parameters` "rope_type"):
  linear   position interpolation (Chen et al. 2023): theta_i / factor
  dynamic  NTK-aware (bloc97/emozilla 2023): beyond max_position_embeddings L, with s = max position + 1 of the
           batch, base' = base * (factor * s / L - (factor - 1))^(d / (d - 2))
  llama3   Llama 3.1's frequency-dependent interpolation (long wavelengths / factor, short kept, a smooth band)
  yarn     Peng et al. 2023, "YaRN": interpolation ramped in by rotation count between beta_slow and beta_fast
           (eq. 17-19), and cos/sin scaled by the attention factor 0.1 ln(factor) + 1 (eq. 22)
  longrope Ding et al. 2024, "LongRoPE" (Phi-3): theta_i / ext_i with per-dimension factors, the short ones up to
           original_max_position_embeddings and the long ones past it, cos/sin scaled by
           sqrt(1 + ln(factor) / ln(original_max_position_embeddings))
"""
import math

import torch

from . import checks

# the fields each rope_scaling type needs (HF's _validate_*_rope_parameters); numbers finite and > 0
ROPE_FIELDS = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
               "longrope": ("short_factor", "long_factor")}
# optional numeric fields, checked when present
ROPE_OPTIONAL = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "factor",
                 "original_max_position_embeddings")


def rope_scaling(scaling, source, d: dict | None = None, rotary_dim: int | None = None) -> dict | None:
    """config.json's rope_scaling (or transformers 5's rope_parameters) checked: a supported type with all of its
    fields, as the dict ModelConfig keeps (None for the default rope). `d`: the whole config.json, for the
    original_max_position_embeddings that yarn and longrope default to (Phi-3 keeps it at the top level, which
    wins, as in HF). rotary_dim: the rotated dimensions, which longrope's factor lists must cover (half each)."""
    scaling = checks.expect(scaling, dict, source, "rope_scaling")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return None
    kind = "longrope" if kind == "su" else kind  # Phi-3's early name for it
    if not isinstance(kind, str) or kind not in ROPE_FIELDS:
        raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported (supported: "
                         f"{', '.join(ROPE_FIELDS)})")
    out = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta", "partial_rotary_factor")}
    d = d or {}
    if kind in ("yarn", "longrope"):
        if d.get("original_max_position_embeddings") is not None:
            out["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        out.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
    for k in ROPE_FIELDS[kind]:
        if out.get(k) is None:
            raise ValueError(f"{source}: rope_scaling of type {kind} needs {k}")
    for k in set(ROPE_FIELDS[kind]) | set(ROPE_OPTIONAL):
        if out.get(k) is None or k.endswith("_factor") and kind == "longrope" and k != "attention_factor":
            continue
        checks.positive(out[k], source, f"rope_scaling.{k}")
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(f"{source}: rope_scaling.high_freq_factor={out['high_freq_factor']} must be greater "
                         f"than low_freq_factor={out['low_freq_factor']} (the band between them is interpolated)")
    if kind == "longrope":
        for k in ("short_factor", "long_factor"):
            f = checks.expect(out[k], list[float], source, f"rope_scaling.{k}")
            if rotary_dim is not None and len(f) != rotary_dim // 2:
                raise ValueError(f"{source}: rope_scaling.{k} has {len(f)} entries, the rotary dimension "
                                 f"{rotary_dim} needs {rotary_dim // 2}")
    return {**out, "rope_type": kind}


def _default_inv(base: float, dim: int, device=None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def rope_inv_freq(cfg, device=None, seq_len=None, layer_type: str = "full_attention"):
    """(theta (dim/2,), attention scaling of cos/sin) for one layer type; seq_len: the batch's max position + 1
    (dynamic and longrope depend on it). Gemma 3's sliding layers have their own base and no scaling."""
    local = layer_type == "sliding_attention" and cfg.rope_local_theta is not None
    base = cfg.rope_local_theta if local else cfg.rope_theta
    s = None if local else cfg.rope_scaling
    dim = cfg.rotary_dim
    kind = s["rope_type"] if s else "default"
    if kind in ("default", "linear", "llama3"):
        inv = _default_inv(base, dim, device)
        if kind == "linear":
            inv = inv / s["factor"]
        elif kind == "llama3":
            inv = _llama3(inv, s)
        return inv, 1.0
    if kind == "dynamic":
        L, factor = cfg.max_position_embeddings, s["factor"]
        if seq_len is None or seq_len <= L:  # HF: back to the original frequencies within the trained length
            return _default_inv(base, dim, device), 1.0
        # as HF: a 0-d tensor, so the new base is computed in fp32 like theirs
        seq = torch.tensor(seq_len, device=device)
        base = base * ((factor * seq / L) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
                               / dim)), 1.0
    if kind == "yarn":
        return _yarn(base, dim, s, cfg.max_position_embeddings, device)
    # longrope
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or cfg.max_position_embeddings / orig
    scale = s.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ext = torch.tensor(s["long_factor"] if seq_len is not None and seq_len > orig else s["short_factor"],
                       dtype=torch.float32, device=device)
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (ext * base ** shape), scale


def _llama3(inv, s):
    # Llama 3.1: wavelengths longer than old_ctx/low_freq_factor are slowed by `factor`, shorter than
    # old_ctx/high_freq_factor are kept, and the band between is interpolated smoothly.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
    return torch.where(medium, smoothed, scaled)


def _yarn(base, dim, s, max_pos, device):
    """YaRN (Peng et al. 2023): per dimension, interpolation (theta / factor) for dimensions that rotate fewer than
    beta_slow times over the original context, extrapolation (theta) above beta_fast, a linear ramp between."""
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_pos / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    scale = s.get("attention_factor")
    if scale is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        scale = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension that turns `rotations` times over the original context
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))
    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF: avoid a division by zero
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    extrapolation = 1 - ramp                                   # 1: keep theta, 0: theta / factor
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, scale


def rope_cos_sin(cfg, position_ids: torch.Tensor, dtype, layer_type: str = "full_attention"):
    """cos/sin tables (B, T, rotary_dim) for the given positions, computed in fp32 (times the scaling's attention
    factor, as HF does)."""
    dynamic = cfg.rope_scaling and cfg.rope_scaling["rope_type"] in ("dynamic", "longrope")
    seq_len = int(position_ids.max()) + 1 if dynamic and position_ids.numel() else None  # (a host sync)
    inv, scale = rope_inv_freq(cfg, position_ids.device, seq_len, layer_type)
    freqs = position_ids[..., None].float() * inv          # (B, T, rd/2)
    emb = torch.cat((freqs, freqs), dim=-1)                # (B, T, rd): HF pairs i with i + rd/2
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x: (B, H, T, hd); cos/sin: (B, T, rd), rd <= hd: the first rd dimensions rotate, the rest pass (Phi-3's
    partial rotary)."""
    cos, sin = cos[:, None], sin[:, None]
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)
