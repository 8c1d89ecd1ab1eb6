"""MAM adapter ("Mix-And-Match"): prefix tuning on attention + a scaled parallel adapter on the FFN.

He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning" (ICLR 2022), section 4.6:
  attention:  head_l = Attn(Q_l, [P_l^K ; K_l], [P_l^V ; V_l])        prefix tuning, l = 30 slots
              (peft/prefix.py: the same prefix, table and optional MLP reparameterisation)
  FFN:        h <- FFN(x) + s * W_up f(W_down x + b_down) + b_up        parallel adapter, Eq. (10) with the scale s:
              x is the FFN's input (not its output, as in Houlsby's sequential adapter), width 512, s = 4, f = ReLU
              (peft/adapters.py's bottleneck, W_up zero at init: the FFN is unchanged at init)
The paper's MAM uses 6.7% of BART-large's parameters; the prefix is not the identity at init (its keys are
attended to), so neither is MAM.

The returned model is prefix tuning's wrapper (peft/prefix.py) around a base whose `mlp` modules are
ParallelAdapterMLP (the MLP's own gate/up/down_proj keep their names). nanotune's own format (HF PEFT has no
MAM): adapter_config.json {"peft_type": "MAM", ...}, adapter_model.safetensors with PEFT's prefix tensor
`prompt_embeddings` (n, L*2*n_kv*hd) and `base_model.model.model.layers.<i>.mlp.adapter_down.weight` (w, d),
`.adapter_down.bias`, `.adapter_up.weight` (d, w), `.adapter_up.bias`. Not mergeable (non-linear adapter, prefix).
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from model.model import ACTIVATIONS

from . import core, prefix, prompt
from .adapters import add_bottleneck, bottleneck
from .prompt import check_positive, load_extra, save_extra  # noqa: F401  (the prefix's encoder file)


@dataclass
class MamConfig:
    peft_type = "MAM"
    methods = {"mam": {}}
    flags = {"num_virtual_tokens": "num_virtual_tokens", "prefix_projection": "prefix_projection",
             "encoder_hidden_size": "encoder_hidden_size", "mam_adapter_size": "adapter_size",
             "mam_scaling": "scaling", "adapter_activation": "activation"}
    num_virtual_tokens: int = 30           # the paper's l = 30
    prefix_projection: bool = False        # prefix.py's MLP reparameterisation (the paper trains through one)
    encoder_hidden_size: int | None = None
    init_weights: str | None = None        # prefix.py's option
    adapter_size: int = 512                # the paper's bottleneck width r = 512
    scaling: float = 4.0                   # the paper's s = 4
    activation: str = "relu"
    token_dim: int | None = None           # filled by apply() (prefix.py)
    num_layers: int | None = None
    num_attention_heads: int | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        check_positive("MamConfig", num_virtual_tokens=self.num_virtual_tokens, adapter_size=self.adapter_size,
                       encoder_hidden_size=self.encoder_hidden_size)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MamConfig.activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")

    def to_json(self) -> dict:
        return {**asdict(self), "peft_type": self.peft_type}

    @classmethod
    def from_json(cls, d: dict, source: str = "adapter_config.json"):
        return core.build_config(cls, d, source)


class ParallelAdapterMLP(nn.Module):
    """FFN(x) + s * bottleneck(x). Holds the MLP's own children under their names (so `mlp.gate_proj.weight` is
    still the base checkpoint's key) and calls the MLP's forward."""
    adapter_names = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")

    def __init__(self, mlp: nn.Module, d: int, cfg, device):
        super().__init__()
        self.__dict__["mlp"] = mlp  # not a child: its children are ours, below
        for name, child in mlp.named_children():
            self.add_module(name, child)
        w = next(mlp.parameters())  # adapter weights stay fp32 over a half-precision base, as in core.LinearWrapper
        add_bottleneck(self, d, cfg.adapter_size, cfg.activation, device,
                       w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32)
        self.scaling = cfg.scaling

    @property
    def router_logits(self):  # a mixture of experts' last router logits (moe.aux_loss), None for a dense MLP
        return getattr(self.mlp, "router_logits", None)

    def forward(self, x, *args):
        y = self.mlp(x, *args)                                       # (B, T, d)
        return y + (self.scaling * bottleneck(self, x)).to(y.dtype)


CONFIGS = (MamConfig,)


def add_parallel_adapters(model: nn.Module, cfg) -> nn.Module:
    """Replace every decoder layer's feed-forward block (`mlp`, Mixtral's `block_sparse_moe`; a dense MLP or a
    mixture of experts) by a ParallelAdapterMLP; freeze all but the adapters."""
    d = model.cfg.hidden_size
    for layer in model.model.layers:
        ffn = getattr(layer, layer.ffn_name)
        setattr(layer, layer.ffn_name, ParallelAdapterMLP(ffn, d, cfg, next(ffn.parameters()).device))
    # (merging the prefix or a non-linear adapter into W is impossible: no merge / unmerge here)
    core.freeze(model)
    return model


def apply(model: nn.Module, cfg: MamConfig) -> nn.Module:
    wrapper = prefix.apply(add_parallel_adapters(model, cfg), cfg)   # freezes the base, adapters included
    for p in core.adapter_parameters(wrapper.base).values():
        p.requires_grad_(True)
    return wrapper


def disabled(model):
    """peft.disabled: the base alone, no prefix (the wrapper calls its base) and no parallel adapters."""
    return core.forwards_replaced([(model, model.base_forward)] +
                                  [(m, m.mlp) for m in model.modules() if isinstance(m, ParallelAdapterMLP)])


def export_state(model) -> dict:
    return {**prompt.export_state(model), **core.export_state(model.base)}


def import_state(model, sd: dict, source: str = "adapter_model.safetensors"):
    """The prefix (prompt.import_state) and the adapters (core.import_state), each naming what is wrong."""
    prompt.import_state(model, {k: v for k, v in sd.items() if k == "prompt_embeddings"}, source)
    core.import_state(model.base, {k: v for k, v in sd.items() if k != "prompt_embeddings"}, source)
    return model
