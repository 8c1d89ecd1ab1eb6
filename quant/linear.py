"""NF4Linear: a frozen linear layer stored as NF4 (+ double quant) at rest, computed in the input's dtype.

Dettmers et al. 2023 (QLoRA), eq. 5:  Y = X · doubleDequant(c1, c2, W_nf4)^T  (+ s·X·L1·L2: QLoraLinear below).
The 4-bit weight is never trained, so backward needs only dL/dX = dL/dY · W: the weight is dequantized again in
backward instead of being saved, so a layer costs ~0.52 bytes/param between steps (0.5 for the codes, 1/64 for
the 8-bit absmax, 4/(64·256) for the nested absmax) and one full-precision copy only while it runs.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from peft.lora import LoraConfig, LoraLinear

from .cuda import dequantize  # our CUDA kernel for CUDA tensors when it builds, else the torch path
from .nf4 import NF4State, check_state, from_bnb_tensors, quantize_nf4, to_bnb_tensors


class NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W rebuilt from NF4 in forward AND in backward (nothing weight-sized is saved)."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        w = layer.dequantize(x.dtype)                              # (out, in), freed after this call
        ctx.layer = layer
        ctx.bias_grad = bias is not None and bias.requires_grad
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_y):                                     # grad_y: (..., out)
        grad_x = grad_y @ ctx.layer.dequantize(grad_y.dtype) if ctx.needs_input_grad[0] else None  # (..., in)
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.bias_grad else None
        return grad_x, grad_b, None


class NF4Weight:
    """Mixin holding a 4-bit weight as buffers: `weight` (packed uint8 (ceil(n/2), 1)), `absmax` (fp32, or uint8
    with `nested_absmax` and the 0-d `nested_offset`), in bitsandbytes' layout (quant/nf4.py). Shared by
    NF4Linear and QLoRA's wrapper (quant/qlora.py). Other own parameters (the frozen bias, ...) keep their names."""

    def set_nf4(self, packed: torch.Tensor, state: NF4State, source: str = "NF4Linear"):
        check_state(packed, state, source)
        if len(state.shape) != 2:
            raise ValueError(f"{source}: weight shape {list(state.shape)} is not 2-D (out_features, in_features)")
        self.out_features, self.in_features = state.shape
        self.blocksize, self.weight_dtype = state.blocksize, state.dtype
        self.register_buffer("weight", packed.contiguous().view(-1).view(torch.uint8)[:, None])
        self.register_buffer("absmax", state.absmax)
        dq = state.double_quant
        self.register_buffer("nested_absmax", state.nested_absmax if dq else None)
        self.register_buffer("nested_offset", torch.as_tensor(state.nested_offset, dtype=torch.float32,
                                                              device=state.absmax.device) if dq else None)

    @property
    def state(self) -> NF4State:
        return NF4State(self.absmax, self.blocksize, (self.out_features, self.in_features), self.weight_dtype,
                        self.nested_absmax, self.nested_offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-precision (out, in) weight in `dtype` (default: the dtype it was quantized from)."""
        return dequantize(self.weight, self.state, dtype or self.weight_dtype)

    def nf4_linear(self, x):
        """y = x W^T + b, W dequantized to x's dtype in forward and again in backward.   x: (..., in)"""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return NF4LinearFunction.apply(x, bias, self)

    # state_dict in bitsandbytes' layout (`weight`, `weight.absmax`, ..., `weight.quant_state...`), so a quantized
    # model saves with model.save_pretrained and loads in transformers + bitsandbytes (quant/checkpoint.py)
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for k, v in to_bnb_tensors(self.weight, self.state).items():
            destination[prefix + k] = v
        for k, p in self._parameters.items():
            if p is not None:
                destination[prefix + k] = p if keep_vars else p.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix + "weight")}
        if "weight" not in mine:
            missing_keys.append(prefix + "weight")
            return
        packed, state = from_bnb_tensors(mine, prefix.rstrip("."))
        dev = self.weight.device
        self.set_nf4(packed.to(dev), state.to(dev), prefix.rstrip("."))
        for k, p in self._parameters.items():
            if p is None:
                continue
            if prefix + k not in state_dict:
                missing_keys.append(prefix + k)
            else:
                p.data = state_dict[prefix + k].to(device=dev, dtype=p.dtype)


class NF4Linear(NF4Weight, nn.Module):
    """A frozen linear layer stored in NF4 (see NF4Weight); forward computes in the input's dtype."""

    def __init__(self, packed: torch.Tensor, state: NF4State, bias: torch.Tensor | None = None):
        super().__init__()
        self.set_nf4(packed, state)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        packed, state = quantize_nf4(linear.weight, blocksize, double_quant)
        return cls(packed, state, linear.bias)

    def forward(self, x):                                          # x: (..., in)
        return self.nf4_linear(x)

    def peft_wrapper(self, cfg) -> type:
        """What peft/ asks before wrapping this layer (peft.core.wrapper_for): LoRA becomes QLoRA's wrapper, whose
        base is computed from the 4-bit weight; other methods can't work on packed 4-bit codes."""
        if not isinstance(cfg, LoraConfig):
            raise ValueError(f"{type(cfg).__name__}: the model has NF4-quantized layers; only LoRA (QLoRA, "
                             "quant/qlora.py) is supported on a quantized base")
        if cfg.dora:
            raise ValueError("QLoRA: DoRA over an NF4 base is not supported")
        return QLoraLinear

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.nested_absmax is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocksize={self.blocksize}{dq}"


class QLoraLinear(NF4Weight, LoraLinear):
    """QLoRA: a LoraLinear whose base computation is an NF4 linear; `weight` is the packed 4-bit buffer. What
    NF4Linear.peft_wrapper answers for LoRA, so peft.apply(nf4_model, LoraConfig(...)) is QLoRA."""

    def __init__(self, base: NF4Linear, cfg: LoraConfig):
        # LoraLinear reads the shape, device and dtype from a dense weight: give it a zero-stride stand-in
        stand_in = torch.empty(1, dtype=base.weight_dtype, device=base.weight.device)
        super().__init__(stand_in.expand(base.out_features, base.in_features), base.bias, cfg)
        del self.weight                                         # a plain attribute: replaced by the NF4 buffer
        self.set_nf4(base.weight, base.state, "QLoraLinear")

    @classmethod
    def from_module(cls, module: "NF4Linear", cfg: LoraConfig):
        return cls(module, cfg)

    def base_forward(self, x):
        return self.nf4_linear(x)

    def dense_weight(self) -> torch.Tensor:
        return self.dequantize(self.adapter_dtype)

    def compute_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize(dtype)  # as NF4LinearFunction: in forward and again in backward

    def merge(self):
        raise RuntimeError("QLoRA: merging into 4-bit weights would round the LoRA delta away; use "
                           "quant.qlora.merge_dequantized(model, dtype) for a dense merged model")


def quantize_model(model: nn.Module, skip=("lm_head",), blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """Replace every nn.Linear (except names ending in `skip`) with an NF4Linear, in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not full.endswith(tuple(skip)):
                setattr(module, child_name, NF4Linear.from_linear(child, blocksize, double_quant))
    return model
