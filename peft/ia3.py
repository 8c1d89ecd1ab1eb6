"""(IA)^3, saved in HF PEFT's format.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning":
learned vectors rescale activations element-wise, initialised to ones (identity at init):
    attention targets (k_proj, v_proj):   y = l ⊙ (W x + b),   l: (out,)
    feed-forward targets (down_proj):     y = W (l ⊙ x) + b,   l: (in,)   (scales the MLP's inner activation)
PEFT's defaults per architecture: llama/mistral target k_proj, v_proj, down_proj; qwen2/qwen3 q_proj, v_proj,
down_proj; down_proj is the feed-forward one. Merge folds l into W's rows (and b) or columns.

File keys: `base_model.model.<path>.ia3_l`, shape (out, 1) for attention targets, (1, in) for feed-forward.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import core
from .core import export_state, import_state  # noqa: F401  (the package's save/load use these)

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING for our models
DEFAULT_TARGETS = {"llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
                   "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
                   "mixtral": ["k_proj", "v_proj", "w2"], "gemma": ["q_proj", "v_proj", "down_proj"],
                   "gemma2": ["q_proj", "v_proj", "down_proj"], "gemma3_text": ["q_proj", "v_proj", "down_proj"]}
DEFAULT_FEEDFORWARD = ["down_proj", "w2"]  # (w2: Mixtral's experts)


@dataclass
class IA3Config:
    peft_type = "IA3"
    methods = {"ia3": {}}                         # train.py --method name -> preset fields (see LoraConfig)
    flags = {"ia3_targets": "targets", "ia3_feedforward": "feedforward"}   # train.py flag -> field
    targets: list[str] | str | None = None       # None: PEFT's default for the model type
    feedforward: list[str] | str | None = None   # targets whose input is scaled; None: ["down_proj"]
    base_model_name_or_path: str | None = None

    def to_json(self) -> dict:
        return {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "target_modules": self.targets,
                "feedforward_modules": self.feedforward, "fan_in_fan_out": False, "init_ia3_weights": True,
                "modules_to_save": None, "inference_mode": True,
                "base_model_name_or_path": self.base_model_name_or_path}

    @classmethod
    def from_json(cls, d: dict, source: str = "adapter_config.json") -> "IA3Config":
        core.reject_unsupported(d, ("fan_in_fan_out", "modules_to_save", "exclude_modules"), source)
        return core.build_config(cls, d, source, {"target_modules": "targets", "feedforward_modules": "feedforward"})


class IA3Linear(core.LinearWrapper):
    """y = l ⊙ (W x + b), or y = W (l ⊙ x) + b for a feed-forward layer."""
    adapter_names = ("ia3_l",)

    def __init__(self, weight, bias, cfg: IA3Config, feedforward: bool = False):
        super().__init__(weight, bias)
        self.feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)  # PEFT's storage shapes
        self.ia3_l = nn.Parameter(torch.ones(shape, device=weight.device, dtype=self.adapter_dtype))
        self.merged = False

    def forward(self, x):
        if self.merged:
            return self.base_forward(x)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_forward((x.to(scale.dtype) * scale).to(x.dtype))
        y = self.base_forward(x)
        return (y * scale).to(y.dtype)

    def _scale(self, inverse: bool):
        with torch.no_grad():
            s = self.ia3_l.to(self.weight.dtype)           # (out, 1) scales rows, (1, in) columns
            s = 1 / s if inverse else s
            self.weight.mul_(s)
            if self.bias is not None and not self.feedforward:
                self.bias.mul_(s.flatten())

    def merge(self):
        if not self.merged:
            self._scale(inverse=False)
            self.merged = True

    def unmerge(self):
        if self.merged:
            self._scale(inverse=True)
            self.merged = False


CONFIGS = (IA3Config,)


def apply(model: nn.Module, cfg: IA3Config) -> nn.Module:
    if cfg.targets is None:  # resolved here so adapter_config.json records the real list
        cfg.targets = DEFAULT_TARGETS.get(core.model_type(model), DEFAULT_TARGETS["llama"])
    if cfg.feedforward is None:
        cfg.feedforward = [t for t in DEFAULT_FEEDFORWARD if isinstance(cfg.targets, str) or t in cfg.targets]
    names = core.find_targets(model, cfg.targets, "IA3Config.targets")
    ff = [n for n in names if core.matches(n, cfg.feedforward)]
    if not isinstance(cfg.feedforward, str) and len({n.rsplit(".", 1)[-1] for n in ff}) < len(cfg.feedforward):
        raise ValueError(f"IA3Config.feedforward {cfg.feedforward} must be a subset of the targets {cfg.targets}")
    return core.wrap_targets(model, names, cfg, IA3Linear, extra=lambda name: {"feedforward": name in ff})


def merge(model: nn.Module):
    """W <- diag(l) W, b <- l ⊙ b (attention targets) or W <- W diag(l) (feed-forward targets)."""
    core.call_all(model, IA3Linear, "merge")


def unmerge(model: nn.Module):
    core.call_all(model, IA3Linear, "unmerge")


def unload(model: nn.Module):
    core.unload(model, IA3Linear)
