"""A LLaMA-family decoder (LLaMA 2/3, Mistral, Qwen2, Qwen3) that matches HF transformers number for number.

Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models": pre-norm decoder with
  RMSNorm (Zhang & Sennrich 2019):  y = x / sqrt(mean(x^2) + eps) * g
  RoPE (Su et al. 2021), HF "rotate-half" form:  q' = q * cos + rotate_half(q) * sin
  SwiGLU MLP (Shazeer 2020):  y = W_down( silu(W_gate x) * (W_up x) )
  grouped-query attention (Ainslie et al. 2023): n_kv_heads K/V heads shared by n_heads/n_kv_heads queries.
Qwen2 adds q/k/v biases, Qwen3 adds a per-head RMSNorm on q and k, Mistral a sliding attention window.

Module and parameter names are HF's (`model.layers.0.self_attn.q_proj.weight`, ...) so checkpoints and PEFT
adapter keys map 1:1. PEFT methods hook in by replacing nn.Linear modules (keeping `weight`/`bias`) or through
the explicit `inputs_embeds` / `prefix_kv` arguments of `Transformer.forward`.
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import checks
from .ops import RecomputeSaved, SiluMul, attention

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
# config.json sizes the model is built from: each a positive integer of at most checks.MAX_SIZE
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim")
# the fields each supported rope_scaling type needs (HF's _validate_*_parameters), all finite numbers > 0
ROPE_FIELDS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings")}


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0                    # 0: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # {"rope_type": "llama3" | "linear", ...} or None
    max_position_embeddings: int = 4096
    attention_bias: bool = False         # q/k/v biases (Qwen2 always has them)
    o_bias: bool = False                 # o_proj bias (llama's attention_bias also covers o_proj)
    mlp_bias: bool = False
    qk_norm: bool = False                # Qwen3: RMSNorm over head_dim on q and k
    sliding_window: int | None = None    # Mistral: attend to at most this many previous tokens
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    hf: dict = field(default_factory=dict, repr=False)  # the original config.json, written back on save

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from an HF config.json dict. An unsupported architecture, a value of the wrong type, a size that is
        not a positive integer, heads that don't divide, incomplete rope scaling: a one-line error naming `source`
        and the key, raised before anything is built."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {mt!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        types = {f.name: f.type for f in fields(cls)}
        names = set(types) - {"hf", "attention_bias", "o_bias", "qk_norm", "sliding_window"}
        kw = {k: checks.expect(d[k], types[k], source, k) for k in sorted(names) if d.get(k) is not None}
        if kw.get("hidden_act", "silu") not in ACTIVATIONS:
            raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in kw]
        if missing:
            raise ValueError(f"{source}: missing key(s) {', '.join(missing)}")
        kw.setdefault("num_key_value_heads", kw["num_attention_heads"])
        check_values(kw, source)
        for k in ("attention_bias", "use_sliding_window"):
            checks.expect(d.get(k, False), bool | None, source, k)
        rope = checks.expect(d.get("rope_parameters") or {}, dict, source, "rope_parameters")  # transformers >= 5
        if "rope_theta" in rope:
            kw["rope_theta"] = checks.positive(rope["rope_theta"], source, "rope_parameters.rope_theta")
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            kw["rope_scaling"] = rope_scaling(scaling, source)
        if mt == "qwen2":  # Qwen2 always has q/k/v biases and no o_proj bias
            kw["attention_bias"] = True
        elif mt == "qwen3":
            kw["attention_bias"], kw["qk_norm"] = bool(d.get("attention_bias", False)), True
            kw["o_bias"] = kw["attention_bias"]
        else:
            kw["attention_bias"] = kw["o_bias"] = bool(d.get("attention_bias", False))
        if mt == "mistral":
            window = d.get("sliding_window")
            kw["sliding_window"] = None if window is None else checks.size(window, source, "sliding_window", None)
        elif d.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported for {mt}")
        return cls(**kw, hf=dict(d))

    def to_hf(self) -> dict:
        """The config.json to save: the original dict when there is one, else one built from our fields."""
        if self.hf:
            return dict(self.hf)
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        d = {k: getattr(self, k) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                           "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                           "head_dim", "hidden_act", "rms_norm_eps", "rope_theta",
                                           "rope_scaling", "max_position_embeddings", "tie_word_embeddings",
                                           "bos_token_id", "eos_token_id", "pad_token_id")}
        d["architectures"] = [arch]
        if self.model_type in ("llama", "qwen3"):
            d["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        return d


def check_values(kw: dict, source):
    """The sizes, numbers and token ids among config.json's values for ModelConfig's fields (`kw`, of the right
    types already): positive sizes, heads that divide, an even head_dim, token ids >= 0."""
    for k in SIZES:
        if k in kw:
            checks.size(kw[k], source, k)
    checks.size(kw.get("max_position_embeddings", 1), source, "max_position_embeddings", limit=None)
    for k in ("rms_norm_eps", "rope_theta"):
        if k in kw:
            checks.positive(kw[k], source, k)
    for k in ("bos_token_id", "pad_token_id", "eos_token_id"):
        ids = kw.get(k)
        if not all(checks.matches(i, int) and i >= 0 for i in (ids if isinstance(ids, list) else [ids or 0])):
            raise ValueError(f"{source}: {k} must be a token id (an integer >= 0) or a list of them, got {ids!r}")
    hidden, nh, nkv = kw["hidden_size"], kw["num_attention_heads"], kw["num_key_value_heads"]
    if "head_dim" not in kw and hidden % nh:
        raise ValueError(f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads={nh} (and "
                         f"there is no head_dim)")
    if nh % nkv:
        raise ValueError(f"{source}: num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}")
    if kw.get("head_dim", hidden // nh) % 2:
        raise ValueError(f"{source}: head_dim={kw.get('head_dim', hidden // nh)} is odd (RoPE rotates pairs of "
                         f"dimensions)")


def rope_scaling(scaling, source) -> dict | None:
    """config.json's rope_scaling (or transformers 5's rope_parameters) checked: a supported type with all of its
    fields, as the dict ModelConfig keeps (None for the default rope)."""
    scaling = checks.expect(scaling, dict, source, "rope_scaling")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return None
    if not isinstance(kind, str) or kind not in ROPE_FIELDS:
        raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported (supported: llama3, linear)")
    for k in ROPE_FIELDS[kind]:
        if k not in scaling:
            raise ValueError(f"{source}: rope_scaling of type {kind} needs {k}")
        checks.positive(scaling[k], source, f"rope_scaling.{k}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"{source}: rope_scaling.high_freq_factor={scaling['high_freq_factor']} must be greater "
                         f"than low_freq_factor={scaling['low_freq_factor']} (the band between them is interpolated)")
    return {**scaling, "rope_type": kind}


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 like HF (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == self.weight.dtype == torch.float32:  # the same maths in one fused kernel
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """theta_i = base^(-2i/d), with Llama-3.1's frequency-dependent or linear position-interpolation scaling."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    s = cfg.rope_scaling
    if s and s["rope_type"] == "linear":
        inv = inv / s["factor"]
    elif s and s["rope_type"] == "llama3":
        # Llama 3.1: wavelengths longer than old_ctx/low_freq_factor are slowed by `factor`, shorter than
        # old_ctx/high_freq_factor are kept, and the band between is interpolated smoothly.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(cfg: ModelConfig, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, T, head_dim) for the given positions, computed in fp32."""
    inv = rope_inv_freq(cfg, position_ids.device)
    freqs = position_ids[..., None].float() * inv          # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)                # (B, T, hd): HF pairs i with i + hd/2
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x: (B, H, T, hd); cos/sin: (B, T, hd)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys/values of past tokens per layer, grown by concatenation. Shapes (B, n_kv, S, hd)."""

    def __init__(self, n_layers: int):
        self.k = [None] * n_layers
        self.v = [None] * n_layers

    @property
    def seq_len(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        nh, nkv, hd, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(d, nh * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, nkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, nkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(nh * hd, d, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, prefix_kv=None):
        """x: (B, T, D). mask: (B, 1, T, S) bool (True = attend) or None for plain causal.
        prefix_kv: optional (k, v), each (B, n_kv, P, hd), prepended un-rotated (prefix tuning)."""
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, -1, hd)              # (B, T, nh, hd)
        k = self.k_proj(x).view(B, T, -1, hd)              # (B, T, n_kv, hd)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)      # (B, n_kv, S, hd)
        if prefix_kv is not None:
            k, v = torch.cat([prefix_kv[0], k], dim=2), torch.cat([prefix_kv[1], v], dim=2)
        y = attention(q, k, v, mask)                       # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, h, bias=b)
        self.up_proj = nn.Linear(d, h, bias=b)
        self.down_proj = nn.Linear(h, d, bias=b)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x, recompute: bool = False):
        g, u = self.gate_proj(x), self.up_proj(x)           # (B, T, intermediate)
        if self.act is not F.silu:
            return self.down_proj(self.act(g) * u)
        h = SiluMul.apply(g, u)
        with RecomputeSaved(h, SiluMul.apply, g, u, enabled=recompute):  # SiluMul keeps g and u anyway
            return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, prefix_kv=None, recompute: bool = False):
        """recompute: keep the normed inputs of the projections and SwiGLU's product out of the saved
        activations (RecomputeSaved); off under gradient checkpointing, which recomputes everything."""
        h = self.input_layernorm(x)
        with RecomputeSaved(h, self.input_layernorm, x, enabled=recompute):
            x = x + self.self_attn(h, cos, sin, mask, cache, prefix_kv)
        h = self.post_attention_layernorm(x)
        with RecomputeSaved(h, self.post_attention_layernorm, x, enabled=recompute):
            return x + self.mlp(h, recompute)


def build_mask(attention_mask, T: int, past: int, prefix: int, window: int | None, device):
    """Boolean attention mask (B or 1, 1, T, prefix + past + T), True = attend.

    attention_mask: None, a (B, past + T) padding mask (1 = token, 0 = pad), or a ready (B, 1, T, past + T)
    boolean mask (e.g. block-diagonal for packed sequences). Prefix slots (prefix tuning) are always visible.
    Returns None when plain causal attention is exact, so SDPA can take its fused causal path."""
    S = past + T
    i = torch.arange(T, device=device)[:, None] + past       # query positions (T, 1)
    j = torch.arange(S, device=device)[None, :]               # key positions (1, S)
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask.bool()
        if window is not None:  # packed rows hold each example contiguously: the window is a distance in the row
            mask = mask & (j > i - window)
    else:
        if attention_mask is None and past == 0 and prefix == 0 and (window is None or T <= window):
            return None
        mask = j <= i
        if window is not None:
            mask = mask & (j > i - window)
        mask = mask[None, None]                               # (1, 1, T, S)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
    if prefix:
        mask = torch.cat([mask.new_ones(*mask.shape[:3], prefix), mask], dim=-1)
    # A query with nothing to attend to (a left-pad position) would give NaN, which then leaks into other rows
    # through 0 * NaN in the value product. Let such rows attend everywhere: their outputs are ignored anyway.
    return mask | ~mask.any(-1, keepdim=True)


class Decoder(nn.Module):
    """HF's `model.` sub-module (`LlamaModel`): embeddings, blocks, final norm; the hidden states, no LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, prefix_kv=None,
                cache: KVCache | None = None, checkpointing: bool = False, recompute: bool = True):
        """The arguments as in Transformer.forward. checkpointing: recompute each block in backward (gradient
        checkpointing, when grad is enabled); recompute: Block.forward's selective recomputation otherwise.
        Returns the final normed hidden states (B, T, D)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        past = cache.seq_len if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        cos, sin = rope_cos_sin(self.cfg, position_ids, x.dtype)
        prefix = prefix_kv[0][0].shape[2] if prefix_kv is not None else 0
        mask = build_mask(attention_mask, T, past, prefix, self.cfg.sliding_window, x.device)
        for i, layer in enumerate(self.layers):
            pkv = prefix_kv[i] if prefix_kv is not None else None
            if checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, pkv, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, pkv, recompute=recompute)
        return self.norm(x)


class Transformer(nn.Module):
    """Causal LM: `model` (Decoder) + `lm_head`, state-dict compatible with HF `*ForCausalLM`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.recompute_saved = True  # Block.forward's recompute: False keeps every activation
        self.tie_weights()

    def tie_weights(self):
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Random init (normal(0, std) weights, zero biases, unit norms) for tests and from-scratch runs."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                prefix_kv=None, cache: KVCache | None = None, hidden_only: bool = False):
        """input_ids: (B, T) or inputs_embeds: (B, T, D).
        attention_mask: (B, S) padding mask over past + new tokens, or a (B, 1, T, S) boolean mask.
        position_ids: (B, T); default past .. past + T - 1.
        prefix_kv: per-layer list of (k, v), each (B, n_kv, P, hd), prepended to the keys/values (prefix tuning).
        Returns logits (B, T, vocab), or the final normed hidden states (B, T, D) if hidden_only."""
        x = self.model(input_ids, attention_mask, position_ids, inputs_embeds, prefix_kv, cache,
                       checkpointing=self.gradient_checkpointing and self.training, recompute=self.recompute_saved)
        return x if hidden_only else self.lm_head(x)

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype
