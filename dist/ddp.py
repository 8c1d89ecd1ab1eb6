"""Plain data parallelism ("ZeRO stage 0"): every rank holds the whole model and the whole AdamW state; the
gradients of all ranks are summed in one all-reduce per step, over one flat buffer.

`AllReduceAdamW` has ZeroOptimizer's interface (backward, clip_grad_norm_, step, zero_grad, save/load of a run
checkpoint, gathered), so train.py's step is one function whichever optimizer it holds. fp16 training goes
through a GradScaler here (loss scaling, Micikevicius et al. 2018, "Mixed Precision Training").
"""
import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

WEIGHTS_FILE = "trainable.safetensors"  # a run checkpoint's trainable weights, by parameter name
ZERO_FILE = "zero.safetensors"          # what a ZeroOptimizer writes instead (dist/zero.py)


def sync_grads(params: list[torch.nn.Parameter]):
    """SUM every rank's gradients (each already weighted by 1/N_global tokens, see train.py), one flat buffer."""
    if not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    assert flat.is_contiguous()  # gloo returns wrong data for non-contiguous views
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(p.dtype)
        offset += g.numel()


class AllReduceAdamW:
    """torch AdamW over the model's trainable parameters, with the gradients all-reduced at clip time.

    groups: list of {"params": [parameter names], **AdamW overrides}, as ZeroOptimizer takes them.
    fp16: scale the loss with a GradScaler (unscaled before clipping; a step with inf/nan gradients is skipped)."""

    def __init__(self, model, groups: list[dict], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 fp16: bool = False):
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.names, self.params = list(named), list(named.values())
        fused = all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in self.params)
        self.optimizer = torch.optim.AdamW([dict(g, params=[named[n] for n in g["params"]]) for g in groups],
                                           lr=lr, betas=betas, eps=eps, fused=fused)
        self.scaler = torch.amp.GradScaler(self.params[0].device.type) if fp16 else None

    def backward(self, loss: torch.Tensor):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """All-reduce the gradients, unscale them (fp16), clip to the global norm; returns the norm."""
        sync_grads(self.params)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    def step(self) -> bool:
        """The AdamW step; False if fp16 loss scaling skipped it (inf/nan gradients: the scale drops instead)."""
        if not self.scaler:
            self.optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def finite(self) -> bool:
        """Are all trainable weights finite? (One sum per parameter: a nan/inf anywhere makes it non-finite.)"""
        return bool(torch.isfinite(torch.stack([p.float().sum() for p in self.params]).sum()))

    def gathered(self):
        """The whole weights are on every rank already (ZeroOptimizer's stage 3 gathers them here)."""
        return contextlib.nullcontext()

    def saving(self, model, stream=None, whole: bool = False, extra=None):
        """train.py's final save: nothing to gather or stream (the context yields False: save as usual)."""
        return contextlib.nullcontext(False)

    # ---- run checkpoints (dist/run.py) ----
    def save(self, d: Path, rank: int = 0) -> dict:
        """Write the trainable weights into checkpoint dir `d` (rank 0); returns the state for state.pt."""
        if rank == 0:
            save_file({n: p.detach().contiguous() for n, p in zip(self.names, self.params)}, str(d / WEIGHTS_FILE))
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None}

    @torch.no_grad()
    def load(self, d: Path, state: dict):
        if (d / ZERO_FILE).is_file():
            raise ValueError(f"{d}: written with --zero; resume it with --zero too")
        sd = load_file(str(d / WEIGHTS_FILE), device=str(self.params[0].device))
        missing = [n for n in self.names if n not in sd]
        if missing:
            raise ValueError(f"{d / WEIGHTS_FILE}: no tensor {missing[0]} (saved for another method or model?)")
        for n, p in zip(self.names, self.params):
            p.copy_(sd[n])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
