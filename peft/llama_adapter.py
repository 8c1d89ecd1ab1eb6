"""LLaMA-Adapter: a learned, zero-gated prompt attended to by the top layers (HF PEFT's ADAPTION_PROMPT).

Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention", Eq. (6)-(8)
as PEFT 0.21.2 computes them for llama/mistral: in each of the top `adapter_layers` layers, with a prompt
P_l in R^{len x D} and a scalar gate g_l initialised to 0,
    out = Attn(x) + W_o ( g_l * softmax(Q K_p^T / sqrt(hd)) V_p ),   K_p = W_k P_l,  V_p = W_v P_l
Q are the layer's own (RoPE-rotated) queries; K_p is NOT rotated; the softmax over the len prompt slots is separate
from the token attention (no mask: every query sees the whole prompt); K_p/V_p have n_kv heads, shared by query
groups exactly as in grouped-query attention. g = 0 makes the adapted model the base model exactly.

Module replacement: `self_attn` becomes an `AdaptedAttention` that owns the same q/k/v/o_proj modules, so every
base key is unchanged; the new keys `...self_attn.adaption_prompt` (1, len, D) and `...self_attn.adaption_gate` (1,)
are PEFT's. Differences from PEFT: o_proj's bias (llama attention_bias=True) is not added a second time to the
adapter branch (PEFT's o_proj(adapter) would break identity at init there); Qwen2/Qwen3 work (PEFT refuses
them), with Qwen3's q_norm applied to Q like in the token attention.
"""
import math
import types
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.model import Attention, apply_rope

from . import core
from .core import build_config
from .prompt import check_positive


@dataclass
class LlamaAdapterConfig:
    adapter_len: int = 10                # prompt slots per adapted layer
    adapter_layers: int = 8              # adapt the top `adapter_layers` layers
    target_modules: str = "self_attn"    # the only attention module name of our model (PEFT's default for llama)
    base_model_name_or_path: str | None = None
    peft_type = "ADAPTION_PROMPT"
    methods = {"llama_adapter": {}}               # train.py --method name -> preset fields (see LoraConfig)
    flags = {"adapter_len": "adapter_len", "adapter_layers": "adapter_layers"}

    def __post_init__(self):
        check_positive("LlamaAdapterConfig", adapter_len=self.adapter_len, adapter_layers=self.adapter_layers)
        if self.target_modules != "self_attn":
            raise ValueError(f"LlamaAdapterConfig: target_modules must be 'self_attn', got {self.target_modules!r}")

    def to_json(self) -> dict:
        return {**asdict(self), "peft_type": self.peft_type, "task_type": "CAUSAL_LM", "inference_mode": True}

    @classmethod
    def from_json(cls, d: dict, source: str = "adapter_config.json"):
        return build_config(cls, d, source)


class AdaptedAttention(Attention):
    """The base attention plus the gated prompt branch; built from an existing Attention (shares its modules)."""

    @classmethod
    def from_module(cls, attn: Attention, adapter_len: int) -> "AdaptedAttention":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.cfg, new.layer_idx = attn.cfg, attn.layer_idx
        for name, child in attn.named_children():           # q_proj, k_proj, v_proj, o_proj (+ q_norm, k_norm)
            setattr(new, name, child)
        w = attn.q_proj.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32   # quantised bases: keep the prompt fp32
        new.adaption_prompt = nn.Parameter(torch.empty(1, adapter_len, attn.cfg.hidden_size, device=w.device,
                                                        dtype=dtype).normal_())      # N(0, 1) like PEFT
        new.adaption_gate = nn.Parameter(torch.zeros(1, device=w.device, dtype=dtype))
        return new

    def to_base(self) -> Attention:
        """The plain Attention again (same modules), for removing the adapter."""
        attn = Attention.__new__(Attention)
        nn.Module.__init__(attn)
        attn.cfg, attn.layer_idx = self.cfg, self.layer_idx
        for name, child in self.named_children():
            setattr(attn, name, child)
        return attn

    def forward(self, x, cos, sin, mask, cache=None, prefix_kv=None):
        out = super().forward(x, cos, sin, mask, cache, prefix_kv)       # (B, T, D)
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        # The token attention doesn't return its queries; recompute them (one extra q_proj, as PEFT does).
        q = self.q_proj(x).view(B, T, -1, hd)                            # (B, T, nh, hd)
        if self.cfg.qk_norm:
            q = self.q_norm(q)
        q = apply_rope(q.transpose(1, 2), cos, sin)                      # (B, nh, T, hd)
        p = self.adaption_prompt.to(x.dtype)                             # (1, len, D)
        L = p.shape[1]
        k = self.k_proj(p).view(1, L, -1, hd).transpose(1, 2)            # (1, n_kv, len, hd), no RoPE
        v = self.v_proj(p).view(1, L, -1, hd).transpose(1, 2)
        # GQA: query group g uses K/V head g. The batch copies and PEFT's op order (fp32 softmax, gate on the
        # probabilities) are deliberate: the same kernels round the same way, so we match PEFT bit for bit even on
        # the 30-layer SmolLM2 (a broadcast matmul or SDPA differ by ~1e-5 relative there).
        k = k.expand(B, -1, -1, -1).repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, nh, len, hd)
        v = v.expand(B, -1, -1, -1).repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scores = q @ k.transpose(2, 3) / math.sqrt(hd)                   # (B, nh, T, len)
        probs = self.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)
        y = probs @ v                                                    # (B, nh, T, hd)
        return out + F.linear(y.transpose(1, 2).reshape(B, T, -1), self.o_proj.weight)  # o_proj without bias


def _layers(model, cfg: LlamaAdapterConfig):
    n = model.cfg.num_hidden_layers
    if cfg.adapter_layers > n:
        raise ValueError(f"LlamaAdapterConfig: adapter_layers={cfg.adapter_layers} exceeds the model's {n} layers")
    return model.model.layers[n - cfg.adapter_layers:]


CONFIGS = (LlamaAdapterConfig,)


def apply(model, cfg: LlamaAdapterConfig):
    """Freeze `model` and swap the top layers' self_attn for AdaptedAttention (in place; returns model)."""
    layers = _layers(model, cfg)
    if model.cfg.fused_qkv or model.cfg.attn_softcap is not None:
        raise ValueError(f"LlamaAdapter: not supported for model_type {model.cfg.model_type} (fused qkv_proj or "
                         f"soft-capped attention)")
    model.requires_grad_(False)
    for layer in layers:
        if isinstance(layer.self_attn, AdaptedAttention):
            raise ValueError(f"LlamaAdapter: layer {layer.self_attn.layer_idx} is already adapted")
        layer.self_attn = AdaptedAttention.from_module(layer.self_attn, cfg.adapter_len)
    model.peft_config = cfg
    return model


def disabled(model):
    """peft.disabled: the adapted layers run the plain token attention (no gated prompt branch)."""
    return core.forwards_replaced([(a, types.MethodType(Attention.forward, a)) for a in _adapted(model)])


def _adapted(model) -> list:
    return [layer.self_attn for layer in model.model.layers if isinstance(layer.self_attn, AdaptedAttention)]


def remove(model):
    """Undo apply: the plain Attention modules back (the base weights were never touched)."""
    for layer in model.model.layers:
        if isinstance(layer.self_attn, AdaptedAttention):
            layer.self_attn = layer.self_attn.to_base()
    return model


def _params(model) -> dict:
    return {f"model.layers.{layer.self_attn.layer_idx}.self_attn.{name}": p
            for layer in model.model.layers if isinstance(layer.self_attn, AdaptedAttention)
            for name, p in (("adaption_prompt", layer.self_attn.adaption_prompt),
                            ("adaption_gate", layer.self_attn.adaption_gate))}


def export_state(model) -> dict:
    """PEFT keys: base_model.model.model.layers.<i>.self_attn.adaption_prompt / adaption_gate (fp32)."""
    return {f"base_model.model.{k}": p.detach().float().cpu().contiguous() for k, p in _params(model).items()}


def import_state(model, sd: dict, source: str = "adapter_model.safetensors"):
    params = {f"base_model.model.{k}": p for k, p in _params(model).items()}
    missing, unexpected = sorted(set(params) - set(sd)), sorted(set(sd) - set(params))
    if missing or unexpected:
        raise ValueError(f"{source}: missing tensors {missing[:4]}, unexpected tensors {unexpected[:4]} "
                         f"(adapter saved for another adapter_layers or base?)")
    for k, p in params.items():
        if sd[k].shape != p.shape:
            raise ValueError(f"{source}: tensor {k} has shape {tuple(sd[k].shape)}, this model needs {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(sd[k])
    return model
