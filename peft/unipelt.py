"""UniPELT: LoRA, prefix tuning and a bottleneck adapter together, each behind a learned sigmoid gate.

Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning" (ACL 2022), sec. 3.2:
  LoRA (W_q, W_v):    y = W x + b + G_L * s * B A x,        G_L = sigmoid(W_GL x + b_GL)   per token   (peft/lora.py)
  adapter (after FFN): h = h_F + G_A * W_up f(W_down h_F),    G_A = sigmoid(W_GA h_F + b_GA)  per token   (peft/adapters.py)
  prefix (attention):  P'_K = G_P^K P_K,  P'_V = G_P^V P_V                                              (peft/prefix.py)
The paper estimates G_P from the layer's input; a per-token gate on the prefix would give every query its own
keys, which one shared prefix (SDPA's K/V) can't express, and AdapterHub's form (the gate averaged over the
sequence) lets later tokens change earlier outputs in a causal LM. nanotune's G_P is therefore a learned pair
per layer, sigmoid(g_l^K), sigmoid(g_l^V), g = 0 at init (gate 0.5). LoRA's B and the adapter's W_up start at
zero, so at init UniPELT equals its gated prefix alone. Defaults are the paper's: r = 8, alpha = 16 on q/v,
prefix length 10, adapter width d/16 after the FFN (down_proj), ReLU.

nanotune's own format (HF PEFT has no UniPELT): adapter_config.json {"peft_type": "UNIPELT", ...};
adapter_model.safetensors with `prompt_embeddings` (PEFT's prefix tensor), `prefix_gate` (L, 2), and under
`base_model.model.<path>.`: `lora_A.weight`, `lora_B.weight`, `lora_gate.weight` (1, in), `lora_gate.bias` (q/v),
`adapter_down.*`, `adapter_up.*`, `adapter_gate.weight` (1, d), `adapter_gate.bias` (down_proj). Not mergeable
(the gates depend on the input).
"""
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from . import core, mam, prefix
from .adapters import AdapterConfig, AdapterLinear, bottleneck
from .lora import LoraConfig, LoraLinear
from .prompt import check_positive, load_extra, save_extra  # noqa: F401  (the prefix's encoder file)


@dataclass
class UniPeltConfig:
    peft_type = "UNIPELT"
    methods = {"unipelt": {}}
    flags = {"num_virtual_tokens": "num_virtual_tokens", "prefix_projection": "prefix_projection",
             "encoder_hidden_size": "encoder_hidden_size", "lora_r": "r", "lora_alpha": "alpha",
             "lora_dropout": "dropout", "lora_targets": "targets", "adapter_reduction": "reduction_factor",
             "adapter_activation": "activation"}
    num_virtual_tokens: int = 10           # the paper's prefix length
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    reduction_factor: int = 16
    activation: str = "relu"
    token_dim: int | None = None           # filled by apply() (prefix.py)
    num_layers: int | None = None
    num_attention_heads: int | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        check_positive("UniPeltConfig", num_virtual_tokens=self.num_virtual_tokens,
                       encoder_hidden_size=self.encoder_hidden_size)
        self.lora(), self.adapter()  # their own checks

    def lora(self) -> LoraConfig:
        return LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets)

    def adapter(self) -> AdapterConfig:
        return AdapterConfig(kind="pfeiffer", reduction_factor=self.reduction_factor, activation=self.activation)

    def to_json(self) -> dict:
        return {**asdict(self), "peft_type": self.peft_type}

    @classmethod
    def from_json(cls, d: dict, source: str = "adapter_config.json"):
        return core.build_config(cls, d, source)


def _gate(n_in: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(n_in, 1, device=like.weight.device, dtype=like.weight.dtype)  # nn.Linear's init


class GatedLoraLinear(LoraLinear):
    """y = W x + b + sigmoid(W_GL x + b_GL) * s * B A dropout(x)."""
    adapter_names = LoraLinear.adapter_names + ("lora_gate.weight", "lora_gate.bias")

    def __init__(self, weight, bias, cfg: LoraConfig):
        super().__init__(weight, bias, cfg)
        self.lora_gate = _gate(self.in_features, self.lora_A)

    def forward(self, x):
        y = self.base_forward(x)                                          # (B, T, out)
        h = x.to(self.lora_A.weight.dtype)
        g = torch.sigmoid(self.lora_gate(h))                              # (B, T, 1)
        return y + (g * self.lora_B(self.lora_A(self.lora_dropout(h))) * self.scaling).to(y.dtype)


class GatedAdapterLinear(AdapterLinear):
    """h = h_F + sigmoid(W_GA h_F + b_GA) * bottleneck(h_F), h_F the FFN output (down_proj's)."""
    adapter_names = AdapterLinear.adapter_names + ("adapter_gate.weight", "adapter_gate.bias")

    def __init__(self, weight, bias, cfg: AdapterConfig):
        super().__init__(weight, bias, cfg)
        self.adapter_gate = _gate(self.out_features, self.adapter_down)

    def forward(self, x):
        y = self.base_forward(x)                                          # (B, T, d)
        h = y.to(self.adapter_down.weight.dtype)
        return y + (torch.sigmoid(self.adapter_gate(h)) * bottleneck(self, h)).to(y.dtype)


class GatedPrefixWrapper(prefix.PrefixWrapper):
    """Prefix tuning with layer l's keys scaled by sigmoid(g_l^K) and values by sigmoid(g_l^V)."""

    def __init__(self, base, encoder, cfg):
        super().__init__(base, encoder, cfg)
        L = base.cfg.num_hidden_layers
        self.prefix_gate = nn.Parameter(torch.zeros(L, 2, device=base.device))  # (L, 2): sigmoid(0) = 0.5

    def prefix_kv(self, B: int, dtype) -> list:
        g = torch.sigmoid(self.prefix_gate).to(dtype)                     # (L, 2)
        return [(k * g[i, 0], v * g[i, 1]) for i, (k, v) in enumerate(super().prefix_kv(B, dtype))]


CONFIGS = (UniPeltConfig,)


def apply(model: nn.Module, cfg: UniPeltConfig) -> nn.Module:
    """Gated LoRA on cfg.targets, a gated adapter after each FFN (down_proj), a gated prefix on every layer."""
    core.wrap_targets(model, core.find_targets(model, cfg.targets, "UniPeltConfig.targets"), cfg.lora(),
                      GatedLoraLinear)
    core.wrap_targets(model, core.find_targets(model, ["down_proj"], "UniPeltConfig (the adapter after the FFN; "
                                               "take down_proj out of the LoRA targets)"), cfg.adapter(),
                      GatedAdapterLinear)
    wrapper = prefix.apply(model, cfg, GatedPrefixWrapper)               # freezes the base, LoRA/adapters included
    for p in core.adapter_parameters(wrapper.base).values():
        p.requires_grad_(True)
    return wrapper


def disabled(model):
    """peft.disabled: the base alone: no prefix, every gated LoRA / adapter layer runs its frozen linear."""
    return core.forwards_replaced([(model, model.base_forward)] +
                                  [(m, m.base_forward) for m in model.modules() if isinstance(m, core.LinearWrapper)])


def export_state(model) -> dict:
    return {**mam.export_state(model), "prefix_gate": model.prefix_gate.detach().contiguous()}


def import_state(model, sd: dict, source: str = "adapter_model.safetensors"):
    if "prefix_gate" not in sd:
        raise ValueError(f"{source}: missing tensor prefix_gate")
    if tuple(sd["prefix_gate"].shape) != tuple(model.prefix_gate.shape):
        raise ValueError(f"{source}: tensor prefix_gate has shape {tuple(sd['prefix_gate'].shape)}, this model "
                         f"needs {tuple(model.prefix_gate.shape)}")
    mam.import_state(model, {k: v for k, v in sd.items() if k != "prefix_gate"}, source)
    with torch.no_grad():
        model.prefix_gate.copy_(sd["prefix_gate"])
    return model
