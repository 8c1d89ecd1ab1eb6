"""LLM.int8(): a frozen base whose linears are row-wise absmax int8, multiplied with the mixed-precision
decomposition, and LoRA / DoRA on top (`--method lora8`).

Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale".
Vector-wise quantization (eq. 1-2, section 3.2): each weight row i keeps c_w[i] = max_j |W[i, j]| (bitsandbytes'
`SCB`, fp32) and W8[i, j] = round(127 · W[i, j] / c_w[i]) (int8); each input row likewise gets c_x and X8.
Mixed-precision decomposition (eq. 3 / section 3.3): the input columns O = {j : any |X[:, j]| >= alpha}
(alpha = 6.0) stay in 16 bits against the dequantized weight columns, the rest go through the int8 matmul:
    Y = X[:, O] · dequant(W8)[:, O]^T  +  (c_x ⊗ c_w) / 127² ⊙ (X8[:, ~O] · W8[:, ~O]^T)
bitsandbytes runs the 16-bit part in the input's dtype (fp32 here when the model computes in fp32) and quantizes
X from fp16; we do the same, op for op, so our output matches bitsandbytes' Linear8bitLt. The int8 product runs
in torch._int_mm where it is fast (CUDA; CPUs with AVX-512), else as fp32 matmuls over chunks of <= 1024 columns,
which is exact: every partial sum is an integer below 127² · 1024 < 2^24.
Backward (the base is frozen, so only dL/dX): dL/dY · dequant(W8), as bitsandbytes does. 1 byte/param at rest.

Checkpoints: transformers' `load_in_8bit=True` layout, `<p>.weight` (int8, out x in), `<p>.SCB` (fp32, out),
`<p>.weight_format` (uint8 0 = row-major) + a bitsandbytes quantization_config, read and written without
bitsandbytes. --merge folds s·B·A into the DEQUANTIZED base (quant.qlora.merge_dequantized).
"""
from pathlib import Path

import torch
import torch.nn as nn

import peft
from model.io import _weight_files, read_config, read_safetensors, load_pretrained, save_pretrained
from model.model import Transformer
from model.weights import CheckpointError, check_layers, load_state_dict_into, meta_model
from peft.lora import DoraLinear, LoraConfig, LoraLinear

from .linear import NF4LinearFunction

THRESHOLD = 6.0                  # alpha: an input column with any |x| >= alpha is an outlier column
INV_127 = 7.874015718698502e-3   # 1/127 and 1/127² as the fp32 constants bitsandbytes multiplies by
INV_127_SQ = 6.200124e-05
CHUNK = 1024                     # int8 columns per exact fp32 product (127² · 1024 < 2^24)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' Int8Params: w (out, in) -> (CB int8 (out, in), SCB fp32 (out,)), from w's fp16 value."""
    w16 = w.detach().to(torch.float16)
    scb = w16.abs().amax(dim=1).float()                                   # (out,) c_w, the row absmax
    cb = torch.round(w16 * (127.0 / scb.clamp_min(1e-30)).unsqueeze(1)).to(torch.int8)  # a zero row stays 0
    return cb, scb


def dequantize_rows(cb: torch.Tensor, scb: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """W = CB · SCB / 127 (out, in), computed in fp32 (bitsandbytes' int8_vectorwise_dequant), cast once."""
    return (cb.float() * scb.view(-1, 1) * INV_127).to(dtype)


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (N, K) int8 · b (M, K)^T int8 -> (N, M) int32, exactly."""
    if a.is_cuda and a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0:
        return torch._int_mm(a, b.t())
    if a.device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return torch._int_mm(a, b.t())
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    for k in range(0, a.shape[1], CHUNK):  # each chunk's fp32 sums are exact integers
        out += (a[:, k:k + CHUNK].float() @ b[:, k:k + CHUNK].float().t()).to(torch.int32)
    return out


def quantize_input(x: torch.Tensor, threshold: float):
    """Vector-wise int8 of x (N, K) from fp16 with the outlier columns zeroed: (X8, c_x (N,), outlier columns)."""
    x16 = x.to(torch.float16)
    cols = None
    if threshold > 0:
        big = x16.abs() >= threshold
        cols = big.any(dim=0).nonzero().view(-1)                          # (n_outlier,)
        x16 = x16.masked_fill(big, 0)
    sca = x16.abs().amax(dim=1).float()                                   # (N,)
    ca = torch.round(x16 * (127.0 / sca.clamp_min(1e-30)).unsqueeze(1)).to(torch.int8)
    if cols is not None and cols.numel():
        ca[:, cols] = 0                                                   # the whole column goes the 16-bit way
    return ca, sca, cols


def int8_linear(x2: torch.Tensor, cb, scb, bias, threshold: float) -> torch.Tensor:
    """Eq. 3: x2 (N, in) in the compute dtype -> (N, out); int8 part + outlier columns in x2's dtype."""
    ca, sca, cols = quantize_input(x2, threshold)
    y = int8_mm(ca, cb) * (sca.view(-1, 1) * scb.view(1, -1)) * INV_127_SQ   # (N, out) fp32
    if bias is not None:
        y = y + bias
    y = y.to(x2.dtype)
    if cols is not None and cols.numel():
        y = y.addmm(x2[:, cols], dequantize_rows(cb[:, cols], scb, x2.dtype).t())
    return y


class Int8LinearFunction(NF4LinearFunction):
    """y = LLM.int8(x, W8) + b; backward is NF4LinearFunction's, dL/dx = dL/dy · layer.dequantize() (W8 rebuilt,
    nothing weight-sized kept)."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer, ctx.bias_grad = layer, bias is not None and bias.requires_grad
        y = int8_linear(x.reshape(-1, x.shape[-1]), layer.weight, layer.SCB, bias, layer.threshold)
        return y.view(*x.shape[:-1], y.shape[-1])


class Int8Weight:
    """Mixin holding `weight` (int8 (out, in)) and `SCB` (fp32 (out,)) buffers in bitsandbytes' layout; shared by
    Int8Linear and the LoRA / DoRA wrappers. The bias, if any, stays a frozen Parameter of its own name."""
    threshold = THRESHOLD

    def set_int8(self, cb: torch.Tensor, scb: torch.Tensor, threshold: float, source: str = "Int8Linear"):
        if cb.dtype != torch.int8 or cb.dim() != 2 or scb.shape != (cb.shape[0],):
            raise ValueError(f"{source}: expected weight int8 (out, in) and SCB (out,), got {cb.dtype} "
                             f"{list(cb.shape)} and {list(scb.shape)}")
        self.out_features, self.in_features = cb.shape
        self.threshold = float(threshold)
        self.register_buffer("weight", cb.contiguous())
        self.register_buffer("SCB", scb.float().contiguous())

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_rows(self.weight, self.SCB, dtype)

    def int8_forward(self, x):                                            # x: (..., in)
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            bias = self.bias.to(dtype) if self.bias is not None else None
            return Int8LinearFunction.apply(x.to(dtype), bias, self)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)   # weight, SCB, bias (+ a wrapper's own)
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)  # row-major, as bnb writes

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        state_dict.pop(prefix + "weight_format", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 threshold={self.threshold}"


class Int8Linear(Int8Weight, nn.Module):
    """A frozen linear layer stored as LLM.int8 (see the module docstring)."""

    def __init__(self, cb, scb, bias: torch.Tensor | None = None, threshold: float = THRESHOLD):
        super().__init__()
        self.set_int8(cb, scb, threshold)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = THRESHOLD) -> "Int8Linear":
        return cls(*quantize_rows(linear.weight), linear.bias, threshold)

    def forward(self, x):
        return self.int8_forward(x)

    def peft_wrapper(self, cfg) -> type:
        """What peft/ asks before wrapping this layer (peft.core.wrapper_for): LoRA / DoRA over the int8 base."""
        if not isinstance(cfg, LoraConfig):
            raise ValueError(f"{type(cfg).__name__}: the model has LLM.int8 layers; only LoRA / DoRA "
                             "(--method lora8, quant/int8.py) is supported on an 8-bit base")
        return Dora8Linear if cfg.dora else Lora8Linear


class Lora8Linear(Int8Weight, LoraLinear):
    """LoRA over an int8 base: y = LLM.int8(x, W8) + b + s · B A dropout(x); `weight` is the int8 buffer."""

    def __init__(self, base: Int8Linear, cfg: LoraConfig):
        # LoraLinear reads the shape and device from a dense weight: a zero-stride fp32 stand-in
        stand_in = torch.empty(1, device=base.weight.device).expand(base.out_features, base.in_features)
        LoraLinear.__init__(self, stand_in, base.bias, cfg)  # not super(): DoRA's init needs the int8 weight
        del self.weight
        self.set_int8(base.weight, base.SCB, base.threshold, type(self).__name__)

    @classmethod
    def from_module(cls, module: Int8Linear, cfg: LoraConfig):
        return cls(module, cfg)

    def base_forward(self, x):
        return self.int8_forward(x)

    def dense_weight(self) -> torch.Tensor:
        return self.dequantize(self.adapter_dtype)

    def forward(self, x):  # the int8 base, not LoraLinear's fused dense-weight function
        result = self.base_forward(x)
        xa = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return result + (self.lora_B(self.lora_A(xa)) * self.scaling).to(result.dtype)

    def merge(self):
        raise RuntimeError(f"{type(self).__name__}: merging into int8 weights would round the LoRA delta away; "
                           "use quant.int8.merge_dequantized(model, dtype) for a dense merged model")


class Dora8Linear(Lora8Linear, DoraLinear):
    """DoRA over an int8 base: DoraLinear's forward with W x from LLM.int8 and ||W + s B A|| from dequant(W8)."""
    forward = DoraLinear.forward

    def __init__(self, base: Int8Linear, cfg: LoraConfig):
        Lora8Linear.__init__(self, base, cfg)
        with torch.no_grad():
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm().to(self.lora_A.weight.dtype))
        self.merged_norm = None


def quantize_model(model: nn.Module, skip=("lm_head",), threshold: float = THRESHOLD) -> nn.Module:
    """Replace every nn.Linear (except names ending in `skip`) by an Int8Linear, in place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and not name.endswith(tuple(skip)):
            peft.core.replace_module(model, name, Int8Linear.from_linear(m, threshold))
    return model


def quantization_config(threshold: float = THRESHOLD) -> dict:
    """The `quantization_config` transformers writes for BitsAndBytesConfig(load_in_8bit=True)."""
    return {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False,
            "llm_int8_threshold": threshold, "llm_int8_skip_modules": None, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False, "bnb_4bit_quant_type": "fp4",
            "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8"}


def load_int8(path, dtype=torch.float32, device="cpu", threshold: float | None = None) -> Transformer:
    """An HF dir -> Transformer with Int8Linear layers: a transformers `load_in_8bit` dir as stored (its
    llm_int8_threshold unless `threshold` is given), any other dir or .gguf quantized now (except lm_head)."""
    path = Path(path)
    if path.suffix == ".gguf" or "quantization_config" not in read_config(path).hf:
        return quantize_model(load_pretrained(path, dtype, device), threshold=THRESHOLD if threshold is None
                              else threshold)
    cfg = read_config(path)
    qc = cfg.hf.pop("quantization_config")  # re-added on save only if the model is still quantized
    source = path / "config.json"
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_8bit"):
        raise CheckpointError(f"{source}: quantization_config is not bitsandbytes 8-bit (load_in_8bit is "
                              f"{qc.get('load_in_8bit') if isinstance(qc, dict) else qc!r})")
    threshold = float(qc.get("llm_int8_threshold", THRESHOLD)) if threshold is None else threshold
    sd = {k: v for f in _weight_files(path) for k, v in read_safetensors(f, device=device).items()}
    check_layers(cfg.num_hidden_layers, sd, source)
    model = meta_model(cfg)
    for key in [k for k in sd if k.endswith(".SCB")]:
        name = key[:-len(".SCB")]
        module = model.get_submodule(name) if f"{name}.weight" in sd else None
        if not isinstance(module, nn.Linear):
            raise CheckpointError(f"{path}: {key}: an 8-bit weight on {type(module).__name__ if module else 'nothing'}"
                                  f" ({name}); LLM.int8 supports only linear layers")
        cb, scb, fmt = sd.pop(f"{name}.weight"), sd.pop(key), sd.pop(f"{name}.weight_format", None)
        if fmt is not None and int(fmt) != 0:
            raise CheckpointError(f"{path}: {name}.weight_format is {int(fmt)}; only 0 (row-major) is supported")
        if tuple(cb.shape) != tuple(module.weight.shape):
            raise CheckpointError(f"{path}: {name}.weight has shape {list(cb.shape)}, config.json implies "
                                  f"{list(module.weight.shape)}")
        bias = sd.pop(f"{name}.bias").to(dtype) if module.bias is not None and f"{name}.bias" in sd else None
        try:
            peft.core.replace_module(model, name, Int8Linear(cb, scb, bias, threshold))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    load_state_dict_into(model, {k: v.to(dtype) for k, v in sd.items()}, str(path))
    return model.eval()


def save_int8(model: Transformer, path):
    """Save a model with Int8Linear layers in transformers' load_in_8bit layout (+ quantization_config)."""
    layers = [m for m in model.modules() if isinstance(m, Int8Weight)]
    if not layers:
        raise ValueError("save_int8: the model has no Int8Linear layers (use model.save_pretrained)")
    return save_pretrained(model, path, config_updates={"quantization_config": quantization_config(
        layers[0].threshold)})


def load_lora8(path, cfg: LoraConfig, dtype=torch.float32, device="cpu") -> nn.Module:
    """--method lora8: the base loaded as LLM.int8 (quantized now, or as stored), LoRA / DoRA on top."""
    return peft.apply(load_int8(path, dtype, device), cfg)


def merge_dequantized(model: nn.Module, dtype=torch.float32) -> nn.Module:
    """Every Lora8Linear -> nn.Linear(dequant(W8) + s B A) (DoRA: m · (W + s B A) / ||·||), Int8Linear ->
    nn.Linear(dequant(W8)), in `dtype`, in place: a plain model that save_pretrained writes as a normal HF dir."""
    from .qlora import merge_dequantized as merge
    return merge(model, dtype, kinds=(Int8Weight,))
