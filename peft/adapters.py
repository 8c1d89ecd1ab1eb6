"""Bottleneck adapters, Houlsby and Pfeiffer placements (nanotune's own format: HF PEFT has none).

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP": a small residual bottleneck MLP is
inserted after a sublayer's output projection, before the residual add:
    h' = h + W_up f(W_down h + b_down) + b_up,   W_down: (d/r, d), W_up: (d, d/r),  r = reduction factor
W_up and b_up start at zero, so h' = h at init. Houlsby places one after the attention output (o_proj) and one
after the MLP (down_proj); Pfeiffer et al. 2021 ("AdapterFusion: Non-Destructive Task Composition for Transfer
Learning") keep only the one after the MLP, at half the cost and about the same quality. Defaults follow
AdapterHub: reduction factor 16, swish (SiLU) for Houlsby, ReLU for Pfeiffer. The adapter is non-linear, so it
can't be merged into the base weights.

Hook: the wrapped o_proj / down_proj keeps its `weight`/`bias` names and adds `adapter_down` / `adapter_up`.
File format (same layout as PEFT): adapter_config.json {"peft_type": "BOTTLENECK", "kind": "houlsby" |
"pfeiffer", "reduction_factor": 16, "activation": "silu", "base_model_name_or_path": ...} and
adapter_model.safetensors with `base_model.model.<path>.adapter_down.weight` (d/r, d), `.adapter_down.bias`
(d/r,), `.adapter_up.weight` (d, d/r), `.adapter_up.bias` (d,), e.g. path `model.layers.0.mlp.down_proj`.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from model.model import ACTIVATIONS

from . import core
from .core import export_state, import_state  # noqa: F401  (the package's save/load use these)

HOOKS = {"houlsby": ["o_proj", "down_proj"], "pfeiffer": ["down_proj"]}
DEFAULT_ACTIVATION = {"houlsby": "silu", "pfeiffer": "relu"}


@dataclass
class AdapterConfig:
    peft_type = "BOTTLENECK"
    methods = {"adapter": {}}                     # train.py --method name -> preset fields (see LoraConfig)
    flags = {"adapter_kind": "kind", "adapter_reduction": "reduction_factor", "adapter_activation": "activation"}
    kind: str = "houlsby"             # "houlsby" (after attention and MLP) | "pfeiffer" (after MLP only)
    reduction_factor: int = 16        # bottleneck width = hidden_size // reduction_factor
    activation: str | None = None     # None: silu (houlsby) / relu (pfeiffer)
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if self.kind not in HOOKS:
            raise ValueError(f"AdapterConfig.kind must be 'houlsby' or 'pfeiffer', got {self.kind!r}")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor <= 0:
            raise ValueError(f"AdapterConfig.reduction_factor must be a positive integer, got {self.reduction_factor!r}")
        self.activation = self.activation or DEFAULT_ACTIVATION[self.kind]
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig.activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")

    def to_json(self) -> dict:
        return {"peft_type": self.peft_type, "kind": self.kind, "reduction_factor": self.reduction_factor,
                "activation": self.activation, "base_model_name_or_path": self.base_model_name_or_path}

    @classmethod
    def from_json(cls, d: dict, source: str = "adapter_config.json") -> "AdapterConfig":
        return core.build_config(cls, d, source)


class AdapterLinear(core.LinearWrapper):
    """y = W x + b;  y + W_up f(W_down y + b_down) + b_up."""
    adapter_names = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")

    def __init__(self, weight, bias, cfg: AdapterConfig):
        super().__init__(weight, bias)
        d = self.out_features
        width = d // cfg.reduction_factor
        if width == 0:
            raise ValueError(f"AdapterConfig.reduction_factor={cfg.reduction_factor} leaves no bottleneck for "
                             f"width {d}")
        add_bottleneck(self, d, width, cfg.activation, weight.device, self.adapter_dtype)

    def forward(self, x):
        y = self.base_forward(x)                        # (B, T, d)
        return y + bottleneck(self, y).to(y.dtype)


def add_bottleneck(owner: nn.Module, d: int, width: int, activation: str, device, dtype):
    """owner.adapter_down (width, d) + bias, owner.adapter_up (d, width) + bias, owner.act: W_down keeps
    nn.Linear's default init, W_up and b_up start at zero (the adapter adds nothing at init). Shared by the
    bottleneck adapters here, MAM's parallel adapter (peft/mam.py) and UniPELT's gated one (peft/unipelt.py)."""
    owner.adapter_down = nn.Linear(d, width, device=device, dtype=dtype)
    owner.adapter_up = nn.Linear(width, d, device=device, dtype=dtype)
    nn.init.zeros_(owner.adapter_up.weight)
    nn.init.zeros_(owner.adapter_up.bias)
    owner.act = ACTIVATIONS[activation]


def bottleneck(owner: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """W_up f(W_down h + b_down) + b_up, in the adapter's dtype."""
    return owner.adapter_up(owner.act(owner.adapter_down(h.to(owner.adapter_down.weight.dtype))))


CONFIGS = (AdapterConfig,)


def apply(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    return core.wrap_targets(model, core.find_targets(model, HOOKS[cfg.kind], "AdapterConfig"), cfg, AdapterLinear)
