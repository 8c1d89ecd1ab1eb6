"""LoRA, rsLoRA and DoRA on linear layers, saved in HF PEFT's format.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen W (out, in) gets a
trainable low-rank update,
    y = W x + b + s * B A dropout(x),   A: (r, in), B: (out, r),   s = alpha / r
A starts kaiming-uniform (a = sqrt(5), PEFT's default; "gaussian": normal(0, 1/r)) and B at zero, so the model
is unchanged at init. rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with
LoRA") uses s = alpha / sqrt(r) so that the update's scale does not shrink as r grows.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") splits the weight into a magnitude m (out,)
and a direction:  W' = m * (W + s B A) / ||W + s B A||_row,  m initialised to ||W||_row (so W' = W at init).
As in the paper (section 4.3) and PEFT, the norm is treated as a constant in backward (detached). PEFT computes
  y = W x + b + (m/n - 1) * W x_d + (m/n) * s * B A x_d,   n = ||W + s B A||_row (detached), x_d = dropout(x)
which equals m/n * (W + sBA) x + b without dropout; we use the same expression so training matches PEFT.

Files (what `PeftModel.from_pretrained` reads): `base_model.model.<path>.lora_A.weight` (r, in),
`.lora_B.weight` (out, r), DoRA's `.lora_magnitude_vector` (out,).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.ops import gemm_operand

from . import core
from .core import export_state, import_state  # noqa: F401  (the package's save/load use these)

# PEFT LoraConfig fields that change the computation and that we don't implement: refuse them on load
UNSUPPORTED = ("fan_in_fan_out", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
               "modules_to_save", "lora_bias", "use_qalora", "layer_replication", "exclude_modules",
               "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "use_bdlora")


@dataclass
class LoraConfig:
    peft_type = "LORA"
    # train.py: the --method names that build this config with the fields they preset (train.py targets every
    # linear layer by default), and the flags that set fields (flag -> field; a [lora] TOML table takes fields)
    methods = {"lora": {"targets": "all-linear"}, "dora": {"targets": "all-linear", "dora": True}}
    flags = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_targets": "targets",
             "lora_rslora": "rslora", "lora_init": "init"}
    bf16_frozen_base = True  # train.py may store the frozen base matrices in bf16 (LoraFunction multiplies them so)

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])  # names | regex | "all-linear"
    rslora: bool = False
    dora: bool = False
    init: str = "default"                      # "default" (kaiming-uniform A) | "gaussian" (normal(0, 1/r) A)
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("default", "gaussian"):
            raise ValueError(f"LoraConfig.init must be 'default' or 'gaussian', got {self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def to_json(self) -> dict:
        return {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "target_modules": self.targets, "use_rslora": self.rslora,
                "use_dora": self.dora, "init_lora_weights": True if self.init == "default" else self.init,
                "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                "base_model_name_or_path": self.base_model_name_or_path}

    @classmethod
    def from_json(cls, d: dict, source: str = "adapter_config.json") -> "LoraConfig":
        core.reject_unsupported(d, UNSUPPORTED, source)
        init = d.get("init_lora_weights", True)
        if init not in (True, False, "gaussian"):  # pissa/olora/loftq/... rewrite the base weights
            raise ValueError(f"{source}: init_lora_weights={init!r} is not supported by nanotune")
        d = {"lora_alpha": 8, **d}  # PEFT's default alpha, not ours
        return core.build_config(cls, d, source, {"lora_alpha": "alpha", "lora_dropout": "dropout",
                                                  "target_modules": "targets", "use_rslora": "rslora",
                                                  "use_dora": "dora"},
                                 init="gaussian" if init == "gaussian" else "default")


class LoraLinear(core.LinearWrapper):
    """y = base_forward(x) + s * B A dropout(x). Keeps the base `weight`/`bias` Parameters under their names."""
    adapter_names = ("lora_A.weight", "lora_B.weight")

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, cfg: LoraConfig):
        super().__init__(weight, bias)
        kw = dict(bias=False, device=weight.device, dtype=self.adapter_dtype)
        self.lora_A = nn.Linear(self.in_features, cfg.r, **kw)
        self.lora_B = nn.Linear(cfg.r, self.out_features, **kw)
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling = cfg.scaling
        self.merged = False
        if cfg.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / cfg.r)
        else:  # nn.Linear's own init, as in Microsoft's loralib and PEFT
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (out, in)

    def forward(self, x):
        if self.merged:
            return self.base_forward(x)
        if not self.weight.requires_grad:  # a frozen base (dense or QLoRA's NF4): the fused function
            dev = x.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            xd = None if isinstance(self.lora_dropout, nn.Identity) else self.lora_dropout(x)
            return LoraFunction.apply(x, xd, self.bias, self.lora_A.weight, self.lora_B.weight, self,
                                      self.scaling, dtype)
        result = self.base_forward(x)  # a base weight that trains too
        x = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return result + (self.lora_B(self.lora_A(x)) * self.scaling).to(result.dtype)

    def merge(self):
        if not self.merged:
            with torch.no_grad():
                self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    def unmerge(self):
        if self.merged:
            with torch.no_grad():
                self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False


class LoraFunction(torch.autograd.Function):
    """y = x W^T + b + s (x_d A^T) B^T for a frozen W, with a hand-written backward (same maths as autograd's
    on the unfused ops, fewer passes over (N, out) tensors):
        g_x = g W + s (g B) A      (the s (g B) A term goes to x_d when dropout makes it a separate tensor)
        g_A = s (g B)^T x_d        g_B = s (x_d A^T)^T g  (transposed)
    Saved for backward: x_d (x itself without dropout: the same tensor the next linear keeps) and the (N, r)
    product x_d A^T; never the (N, out) output. W comes from layer.compute_weight(dtype) in forward and again in
    backward (free for a dense W; QLoRA dequantizes twice rather than keep a full-precision copy). Operands are
    rounded to `dtype` (the autocast dtype, else x's) and multiplied where model.ops.gemm_dtype says."""

    @staticmethod
    def forward(ctx, x, xd, bias, A, B, layer, s: float, dtype):
        shape = x.shape
        with torch.autocast(x.device.type, enabled=False):
            x2 = gemm_operand(x.reshape(-1, shape[-1]), dtype)                 # (N, in)
            xd2 = x2 if xd is None else gemm_operand(xd.reshape(-1, shape[-1]), dtype)
            w, a, b = (gemm_operand(t, dtype) for t in (layer.compute_weight(dtype), A, B))
            xa = xd2 @ a.t()                                                # (N, r)
            y = x2 @ w.t() if bias is None else torch.addmm(gemm_operand(bias, dtype), x2, w.t())
            y.addmm_(xa, b.t(), alpha=s)                                    # (N, out)
        ctx.save_for_backward(x if xd is None else xd, A, B, xa)
        ctx.layer, ctx.s, ctx.dtype, ctx.separate = layer, s, dtype, xd is not None
        ctx.has_bias = bias is not None
        return y.to(dtype).view(*shape[:-1], y.shape[-1])  # (an MoE expert may get 0 tokens)

    @staticmethod
    def backward(ctx, g):
        xd, A, B, xa = ctx.saved_tensors
        s, dtype = ctx.s, ctx.dtype
        g2 = gemm_operand(g.reshape(-1, g.shape[-1]), dtype)                # (N, out)
        a = gemm_operand(A, dtype)
        gb = g2 @ gemm_operand(B, dtype)                                    # (N, r)
        gx = gxd = gbias = None
        if ctx.needs_input_grad[0]:
            gx = g2 @ gemm_operand(ctx.layer.compute_weight(dtype), dtype)  # (N, in)
            if not ctx.separate:
                gx.addmm_(gb, a, alpha=s)
            gx = gx.to(dtype).view(*g.shape[:-1], gx.shape[-1])
        if ctx.separate and ctx.needs_input_grad[1]:
            gxd = (s * (gb @ a)).to(dtype).view(*g.shape[:-1], a.shape[-1])
        xd2 = gemm_operand(xd.reshape(-1, xd.shape[-1]), dtype)
        gA = (gb.t() @ xd2).mul_(s).to(A.dtype)                             # (r, in)
        gB = (xa.t() @ g2).mul_(s).t().contiguous().to(B.dtype)             # (out, r)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gbias = g2.sum(0)
        return gx, gxd, gbias, gA, gB, None, None, None


class DoraLinear(LoraLinear):
    """LoRA plus a trainable magnitude per output row (see the module docstring for the equation)."""
    adapter_names = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")

    def __init__(self, weight, bias, cfg: LoraConfig):
        super().__init__(weight, bias, cfg)
        with torch.no_grad():
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm().to(self.lora_A.weight.dtype))  # (out,)
        self.merged_norm = None

    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row (out,), the DoRA denominator, never differentiated."""
        w = self.dense_weight().to(self.lora_A.weight.dtype)
        return torch.linalg.norm(w + self.delta_weight().detach(), dim=1).detach()

    def forward(self, x):
        result = self.base_forward(x)
        if self.merged:
            return result
        scale = (self.lora_magnitude_vector / self.weight_norm()).view(1, -1)  # (1, out)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            w_x = result if self.bias is None else result - self.bias      # W x, reused from the base pass
        else:  # with dropout PEFT recomputes W x_d on the dropped input
            x = self.lora_dropout(x)
            w_x = F.linear(x, self.dense_weight().to(x.dtype))
        x = x.to(self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(x))
        return result + ((scale - 1) * w_x + scale * lora * self.scaling).to(result.dtype)

    def merge(self):
        if not self.merged:
            with torch.no_grad():
                self.merged_norm = self.weight_norm()  # kept: unmerge needs the norm of the unmerged weight
                factor = (self.lora_magnitude_vector / self.merged_norm).view(-1, 1)
                self.weight.copy_((factor * (self.weight + self.delta_weight())).to(self.weight.dtype))
            self.merged = True

    def unmerge(self):
        if self.merged:
            with torch.no_grad():
                factor = (self.lora_magnitude_vector / self.merged_norm).view(-1, 1)
                self.weight.copy_((self.weight / factor - self.delta_weight()).to(self.weight.dtype))
            self.merged, self.merged_norm = False, None


CONFIGS = (LoraConfig,)


def apply(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Swap each target linear for a LoraLinear (DoraLinear if cfg.dora; a quantized layer's own wrapper, e.g.
    QLoRA's, see core.wrapper_for), freeze the rest."""
    names = core.find_targets(model, cfg.targets, "LoraConfig.targets")
    return core.wrap_targets(model, names, cfg, DoraLinear if cfg.dora else LoraLinear)


def merge(model: nn.Module):
    """W <- W + s B A (DoRA: W <- m * (W + s B A) / ||W + s B A||) in every wrapper; forward then skips the branch."""
    core.call_all(model, LoraLinear, "merge")


def unmerge(model: nn.Module):
    core.call_all(model, LoraLinear, "unmerge")


def unload(model: nn.Module):
    """After merge: back to plain nn.Linear modules (what save_pretrained should write)."""
    core.unload(model, LoraLinear)
