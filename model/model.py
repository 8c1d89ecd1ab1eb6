"""A LLaMA-family decoder that matches HF transformers number for number: LLaMA 2/3, Mistral, Qwen2, Qwen3, Gemma 1/2/3
(text), Phi-3/3.5/4-mini, and the mixture-of-experts Mixtral, Qwen2-MoE and Qwen3-MoE.

Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models": pre-norm decoder with
  RMSNorm (Zhang & Sennrich 2019):  y = x / sqrt(mean(x^2) + eps) * g   (Gemma: g = 1 + w)
  RoPE (Su et al. 2021), HF "rotate-half" form, and its scalings: rope.py
  SwiGLU MLP (Shazeer 2020):  y = W_down( silu(W_gate x) * (W_up x) )  (Gemma: GeGLU, gelu-tanh)
  grouped-query attention (Ainslie et al. 2023): n_kv_heads K/V heads shared by n_heads/n_kv_heads queries.
Qwen2 adds q/k/v biases, Qwen3 adds a per-head RMSNorm on q and k, Mistral a sliding attention window; Gemma's
pieces are in gemma.py, the sparse MoE block in moe.py, the architecture switches in config.py (ModelConfig).

Module and parameter names are HF's (`model.layers.0.self_attn.q_proj.weight`, Phi-3's fused `qkv_proj`, Mixtral's
`block_sparse_moe.experts.0.w1`, ...) so checkpoints and PEFT adapter keys map 1:1. PEFT methods hook in by
replacing nn.Linear modules (keeping `weight`/`bias`) or through the explicit `inputs_embeds` / `prefix_kv`
arguments of `Transformer.forward`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ACTIVATIONS, SUPPORTED_MODEL_TYPES, ModelConfig  # noqa: F401  (importers' names)
from .gemma import ScaledEmbedding, SoftcapLinear
from .moe import SparseMoE
from .ops import RecomputeSaved, Segments, SiluMul, attention
from .rope import apply_rope, rope_cos_sin  # noqa: F401  (peft.llama_adapter and tests import them from here)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (offset + weight), computed in fp32 like HF (Zhang & Sennrich 2019).
    offset 1 is Gemma's (1 + w) gain, whose weights sit around 0; Gemma also multiplies before rounding back."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x):
        g = self.weight + self.offset if self.offset else self.weight
        if x.dtype == self.weight.dtype == torch.float32:  # the same maths in one fused kernel
            return F.rms_norm(x, self.weight.shape, g, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


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
        if cfg.fused_qkv:  # Phi-3: one projection, [q | k | v] along the output
            self.qkv_proj = nn.Linear(d, (nh + 2 * nkv) * hd, bias=False)
        else:
            self.q_proj = nn.Linear(d, nh * hd, bias=cfg.attention_bias)
            self.k_proj = nn.Linear(d, nkv * hd, bias=cfg.attention_bias)
            self.v_proj = nn.Linear(d, nkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(nh * hd, d, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_offset)

    def project(self, x):
        """q (B, T, nh, hd), k and v (B, T, n_kv, hd)."""
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        if self.cfg.fused_qkv:
            nq, nkv = self.cfg.num_attention_heads * hd, self.cfg.num_key_value_heads * hd
            q, k, v = self.qkv_proj(x).split([nq, nkv, nkv], dim=-1)
            return q.view(B, T, -1, hd), k.view(B, T, -1, hd), v.view(B, T, -1, hd)
        return self.q_proj(x).view(B, T, -1, hd), self.k_proj(x).view(B, T, -1, hd), self.v_proj(x).view(B, T, -1, hd)

    def forward(self, x, cos, sin, mask, cache=None, prefix_kv=None):
        """x: (B, T, D). mask: (B, 1, T, S) bool (True = attend), None for causal, or Segments (packed rows).
        prefix_kv: optional (k, v), each (B, n_kv, P, hd), prepended un-rotated (prefix tuning)."""
        B, T, _ = x.shape
        q, k, v = self.project(x)                          # (B, T, nh | n_kv, hd)
        v = v.transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)      # (B, n_kv, S, hd)
        if prefix_kv is not None:
            k, v = torch.cat([prefix_kv[0], k], dim=2), torch.cat([prefix_kv[1], v], dim=2)
        y = attention(q, k, v, mask, self.cfg.attn_scale, self.cfg.attn_softcap)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        if cfg.fused_qkv:  # Phi-3: [gate | up] in one projection
            self.gate_up_proj = nn.Linear(d, 2 * h, bias=False)
        else:
            self.gate_proj = nn.Linear(d, h, bias=b)
            self.up_proj = nn.Linear(d, h, bias=b)
        self.down_proj = nn.Linear(h, d, bias=b)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x, recompute: bool = False):
        if hasattr(self, "gate_up_proj"):
            g, u = self.gate_up_proj(x).chunk(2, dim=-1)    # (B, T, intermediate) each
        else:
            g, u = self.gate_proj(x), self.up_proj(x)       # (B, T, intermediate)
        if self.act is not F.silu:
            return self.down_proj(self.act(g) * u)
        h = SiluMul.apply(g, u)
        with RecomputeSaved(h, SiluMul.apply, g, u, enabled=recompute):  # SiluMul keeps g and u anyway
            return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d, eps, off = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset
        self.input_layernorm = RMSNorm(d, eps, off)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(d, eps, off)
        if cfg.sandwich_norms:  # Gemma 2/3: post_attention_layernorm is on the attention output, these on the MLP
            self.pre_feedforward_layernorm = RMSNorm(d, eps, off)
            self.post_feedforward_layernorm = RMSNorm(d, eps, off)
        # the feed-forward block, under the checkpoint's name (Mixtral: block_sparse_moe)
        self.ffn_name = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
        moe = layer_idx in cfg.moe_layers
        setattr(self, self.ffn_name, SparseMoE(cfg, ACTIVATIONS[cfg.hidden_act]) if moe else MLP(cfg))
        self.sandwich = cfg.sandwich_norms

    def forward(self, x, cos, sin, mask, cache=None, prefix_kv=None, recompute: bool = False):
        """recompute: keep the normed inputs of the projections and SwiGLU's product out of the saved
        activations (RecomputeSaved); off under gradient checkpointing, which recomputes everything."""
        h = self.input_layernorm(x)
        with RecomputeSaved(h, self.input_layernorm, x, enabled=recompute):
            a = self.self_attn(h, cos, sin, mask, cache, prefix_kv)
        x = x + (self.post_attention_layernorm(a) if self.sandwich else a)
        norm = self.pre_feedforward_layernorm if self.sandwich else self.post_attention_layernorm
        h = norm(x)
        with RecomputeSaved(h, norm, x, enabled=recompute):
            m = getattr(self, self.ffn_name)(h, recompute)
        return x + (self.post_feedforward_layernorm(m) if self.sandwich else m)


def build_mask(attention_mask, T: int, past: int, prefix: int, window: int | None, device):
    """Attention mask for ops.attention: a boolean (B or 1, 1, T, prefix + past + T), True = attend, or None / a
    Segments where the fused kernels are exact without one.

    attention_mask: None, a (B, past + T) padding mask (1 = token, 0 = pad), a ready (B, 1, T, past + T) boolean
    mask (e.g. block-diagonal for packed sequences) or its Segments. Prefix slots (prefix tuning) are always visible.
    Returns None when causal attention (aligned to the last key: ops.attention) is exact, Segments when the
    packed rows need neither a cache, a prefix nor a window shorter than their longest example."""
    S = past + T
    if isinstance(attention_mask, Segments):
        if past == 0 and prefix == 0 and (window is None or attention_mask.max_len <= window):
            return attention_mask
        attention_mask = attention_mask.dense(device)
    if attention_mask is None and (window is None or S <= window):
        return None
    i = torch.arange(T, device=device)[:, None] + past       # query positions (T, 1)
    j = torch.arange(S, device=device)[None, :]               # key positions (1, S)
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask.bool()
        if window is not None:  # packed rows hold each example contiguously: the window is a distance in the row
            mask = mask & (j > i - window)
    else:
        mask = j <= i
        if window is not None:
            mask = mask & (j > i - window)
        mask = mask[None, None]                               # (1, 1, T, S)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
    if prefix:
        seen = mask.new_ones(*mask.shape[:3], prefix)
        if window is not None:  # as in HF + PEFT: the prefix is the oldest past, out of a query's window as tokens are
            seen = seen & (torch.arange(prefix, device=device) > i + prefix - window)
        mask = torch.cat([seen, mask], dim=-1)
    # A query with nothing to attend to (a left-pad position) would give NaN, which then leaks into other rows
    # through 0 * NaN in the value product. Let such rows attend everywhere: their outputs are ignored anyway.
    return mask | ~mask.any(-1, keepdim=True)


def lean_mask(batch):
    """The attention mask of a data.collate batch (CPU tensors) for a forward whose outputs are read only where
    labels are, in its cheapest exact form: None for rows that are only right-padded (a real token sees only
    earlier tokens, all real, so plain causal attention gives it the same output; the pad positions, whose
    outputs differ, carry no labels), the Segments of packed rows, else the batch's mask."""
    am = batch["attention_mask"]
    if batch.get("segments") is not None:
        return Segments(batch["segments"])
    if am is not None and am.dim() == 2 and am.device.type == "cpu" and bool((am[:, 1:] <= am[:, :-1]).all()):
        return None
    return am


class Decoder(nn.Module):
    """HF's `model.` sub-module (`LlamaModel`): embeddings, blocks, final norm; the hidden states, no LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d) if cfg.embed_scale is None else \
            ScaledEmbedding(cfg.vocab_size, d, cfg.embed_scale)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)

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
        prefix = prefix_kv[0][0].shape[2] if prefix_kv is not None else 0
        rope, masks = {}, {}  # per layer type (Gemma 2/3: sliding-window and global layers alternate)
        for kind in dict.fromkeys(self.cfg.layer_types):
            rope[kind] = rope_cos_sin(self.cfg, position_ids, x.dtype, kind)
            window = self.cfg.sliding_window if kind == "sliding_attention" else None
            masks[kind] = build_mask(attention_mask, T, past, prefix, window, x.device)
        for i, layer in enumerate(self.layers):
            kind = self.cfg.layer_types[i]
            (cos, sin), mask = rope[kind], masks[kind]
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
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if cfg.final_softcap is None else \
            SoftcapLinear(cfg.hidden_size, cfg.vocab_size, cfg.final_softcap)
        self.gradient_checkpointing = False
        self.recompute_saved = True  # Block.forward's recompute: False keeps every activation
        self.tie_weights()

    def tie_weights(self):
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Random init (normal(0, std) weights, zero biases, unit norm gains) for tests and from-scratch runs."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0 - self.cfg.norm_offset)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    # drawn on the CPU (where the generator lives) whatever the default device: the same seed gives
                    # the same weights on every device, and `with torch.device("cuda")` works
                    p.copy_(torch.randn(p.shape, generator=g, device="cpu") * std)
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
