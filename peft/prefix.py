"""Prefix tuning: trainable keys and values prepended to every attention layer of a frozen model.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation":
    head_l = Attn(Q_l, [P_l^K ; K_l], [P_l^V ; V_l]),   P_l^K, P_l^V in R^{n x d_kv} trained per layer l,
optionally reparameterised during training as P = MLP(P') = W2 tanh(W1 P' + b1) + b2 (PEFT's prefix_projection);
the exported tensor is always the projected prefix.

PEFT's conventions (docs/peft_prompt.md): one tensor `prompt_embeddings` (n, L*2*n_kv*hd); layer l's K is
E.view(n, L, 2, n_kv, hd)[:, l, 0] and V is [:, l, 1] (so GQA models get n_kv heads, not n_heads). Prefix keys are
not rotated (they are in the cache as-is); real tokens take positions n .. n+T-1; the padding mask gets n ones in
front; outputs cover the real tokens only. Hooks through `Transformer.forward(prefix_kv=...)`, which keeps the
prefix out of the KV cache, so generation passes it again at every step.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .core import build_config
from .prompt import Table, VirtualTokenWrapper, check_positive
from .prompt import disabled, export_state, import_state, load_extra, save_extra  # noqa: F401  (same as prompt's)


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = 20
    prefix_projection: bool = False      # train P through an MLP, export MLP(P')
    encoder_hidden_size: int | None = None  # MLP width; default token_dim (PEFT's default)
    init_weights: str | None = None      # None: N(0, 1) like PEFT; "zero": zero prefixes (PEFT's "zero")
    token_dim: int | None = None         # n_kv * head_dim, filled by apply() like PEFT
    num_layers: int | None = None
    num_attention_heads: int | None = None  # n_kv (PEFT's convention for GQA)
    base_model_name_or_path: str | None = None
    peft_type = "PREFIX_TUNING"
    # train.py --method names -> preset fields (see LoraConfig). P-Tuning v2 (Liu et al. 2022) is this method: deep
    # prompts = per-layer K/V prefixes, without the reparameterisation by default (README, docs/peft_prompt.md)
    methods = {"prefix": {}, "ptuning_v2": {"prefix_projection": False}}
    flags = {"num_virtual_tokens": "num_virtual_tokens", "prefix_projection": "prefix_projection",
             "encoder_hidden_size": "encoder_hidden_size", "prefix_init_weights": "init_weights"}

    def __post_init__(self):
        check_positive("PrefixConfig", num_virtual_tokens=self.num_virtual_tokens,
                       encoder_hidden_size=self.encoder_hidden_size)
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"PrefixConfig: init_weights must be None or 'zero', got {self.init_weights!r}")

    def to_json(self) -> dict:
        return {**asdict(self), "peft_type": self.peft_type, "task_type": "CAUSAL_LM",
                "num_transformer_submodules": 1, "inference_mode": True}

    @classmethod
    def from_json(cls, d: dict, source: str = "adapter_config.json"):
        return build_config(cls, d, source)


class PrefixEncoder(nn.Module):
    """P = embedding (n, L*2*d_kv), or with projection P = W2 tanh(W1 P' + b1) + b2 with P' (n, d_kv).
    Parameter names are PEFT's PrefixEncoder (embedding, transform.0, transform.2)."""

    def __init__(self, cfg: PrefixConfig):
        super().__init__()
        n, d, out = cfg.num_virtual_tokens, cfg.token_dim, cfg.num_layers * 2 * cfg.token_dim
        if cfg.prefix_projection:
            h = cfg.encoder_hidden_size or d
            self.embedding = nn.Embedding(n, d)
            self.transform = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, out))
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(n, out)
            last = self.embedding
        if cfg.init_weights == "zero":
            nn.init.zeros_(last.weight)
            if getattr(last, "bias", None) is not None:
                nn.init.zeros_(last.bias)

    def forward(self):
        e = self.embedding.weight                          # (n, d_kv) or (n, L*2*d_kv)
        return self.transform(e) if hasattr(self, "transform") else e


class PrefixWrapper(VirtualTokenWrapper):
    def make_encoder(self):
        return PrefixEncoder(self.peft_config) if self.peft_config.prefix_projection else None

    def prefix_kv(self, B: int, dtype) -> list:
        """Per layer (k, v), each (B, n_kv, n, hd), from the (n, L*2*n_kv*hd) table."""
        c = self.base.cfg
        n, L, nkv, hd = self.n_virtual, c.num_hidden_layers, c.num_key_value_heads, c.head_dim
        e = self.encoder().to(dtype).view(n, L, 2, nkv, hd).permute(1, 2, 3, 0, 4)  # (L, 2, n_kv, n, hd)
        return [(e[i, 0].expand(B, -1, -1, -1), e[i, 1].expand(B, -1, -1, -1)) for i in range(L)]

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, hidden_only=False):
        """Outputs for the real tokens (B, T, ·). attention_mask (B, S) covers real tokens only (past + new) or is
        a (B, 1, T, S) bool mask; the prefix is always visible. position_ids: real-token positions, offset by n."""
        B, T = input_ids.shape
        if position_ids is None:
            past = cache.seq_len if cache is not None else 0
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)
        return self.base(input_ids, attention_mask=attention_mask, position_ids=position_ids + self.n_virtual,
                         prefix_kv=self.prefix_kv(B, self.base.dtype), cache=cache, hidden_only=hidden_only)


CONFIGS = (PrefixConfig,)


def apply(model, cfg: PrefixConfig, wrapper: type = PrefixWrapper):
    """Freeze `model` and wrap it with trainable per-layer K/V prefixes (`wrapper`: UniPELT's gated subclass)."""
    c = model.cfg  # the model's dims go into the config in place, as PEFT does; GQA: n_kv heads
    cfg.token_dim, cfg.num_layers, cfg.num_attention_heads = (c.num_key_value_heads * c.head_dim,
                                                               c.num_hidden_layers, c.num_key_value_heads)
    encoder = PrefixEncoder(cfg)
    if not cfg.prefix_projection:
        encoder = Table(encoder.embedding.weight.data)     # same (n, L*2*d_kv) table, the shared type
    return wrapper(model, encoder.to(model.device), cfg)
