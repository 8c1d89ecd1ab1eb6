"""A toy PEFT method, written the way README's "Adding a PEFT method" says: this one file, plus its name in
peft.MODULES (tests/test_method_table.py does that part with monkeypatch). Output scaling on chosen linears:
    y = s * (W x + b),   s: (out,) trained, starting at `init` (1.0: the model is unchanged at init)
— IA3 without its feed-forward case, in nanotune's own adapter format."""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from peft import core
from peft.core import export_state, import_state  # noqa: F401  (peft's save/load use these)


@dataclass
class ToyScaleConfig:
    peft_type = "TOY_SCALE"
    methods = {"toy_scale": {}}                           # train.py --method name -> preset fields
    flags = {"toy_targets": "targets", "toy_init": "init"}  # train.py flag -> field
    targets: list[str] | str = field(default_factory=lambda: ["o_proj"])
    init: float = 1.0
    base_model_name_or_path: str | None = None

    def to_json(self) -> dict:
        return {"peft_type": self.peft_type, "targets": self.targets, "init": self.init,
                "base_model_name_or_path": self.base_model_name_or_path}

    @classmethod
    def from_json(cls, d: dict, source: str = "adapter_config.json") -> "ToyScaleConfig":
        return cls(targets=d["targets"], init=d["init"], base_model_name_or_path=d.get("base_model_name_or_path"))


CONFIGS = (ToyScaleConfig,)


class ScaledLinear(core.LinearWrapper):
    adapter_names = ("toy_scale",)

    def __init__(self, weight, bias, cfg: ToyScaleConfig):
        super().__init__(weight, bias)
        self.toy_scale = nn.Parameter(torch.full((self.out_features,), float(cfg.init), device=weight.device,
                                                 dtype=self.adapter_dtype))
        self.merged = False

    def forward(self, x):
        y = self.base_forward(x)
        return y if self.merged else y * self.toy_scale.to(y.dtype)

    @torch.no_grad()
    def merge(self):
        self.weight.mul_(self.toy_scale[:, None].to(self.weight.dtype))
        if self.bias is not None:
            self.bias.mul_(self.toy_scale.to(self.bias.dtype))
        self.merged = True


def apply(model: nn.Module, cfg: ToyScaleConfig) -> nn.Module:
    return core.wrap_targets(model, core.find_targets(model, cfg.targets, "ToyScaleConfig.targets"), cfg,
                             ScaledLinear)


def merge(model: nn.Module):
    core.call_all(model, ScaledLinear, "merge")


def unload(model: nn.Module):
    core.unload(model, ScaledLinear)
