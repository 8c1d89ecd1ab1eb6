"""AdaLoRA: LoRA whose rank budget is re-allocated during training, saved in HF PEFT's ADALORA format.

Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (ICLR 2023):
  Eq. (1)  the update in SVD form  W = W0 + P Λ Q,  P: (out, r), Λ = diag(λ): (r,), Q: (r, in)
           (PEFT's names: lora_B = P, lora_E = λ as (r, 1), lora_A = Q), scaled like PEFT by alpha / init_r:
           y = W0 x + b + (alpha / (init_r + 1e-5)) * P (λ ⊙ Q dropout(x))
  Eq. (2)  R(P, Q) = ||P^T P - I||_F + ||Q Q^T - I||_F, the orthogonality regulariser; PEFT (and we) add
           orth_reg_weight * mean over every P and Q of ||.||_F to the loss.
  Eq. (5)  the importance of each triplet (P_:i, λ_i, Q_i:) from the sensitivity I = |w * dL/dw| smoothed
           (Eq. 8, β1) and its uncertainty U (Eq. 9, β2): s(w) = Ī(w) Ū(w), S_i = s(λ_i) + mean s(P_:i) + mean s(Q_i:)
  Eq. (12) the cubic budget schedule over steps t: b(t) = init budget for t <= tinit, then
           b(T_tot - tfinal) + (b(0) - b_target) (1 - (t - tinit) / (T_tot - tfinal - tinit))^3, then the target
           (target_r per matrix) for the last tfinal steps; every deltaT steps the λ_i of the lowest S_i beyond
           the budget are set to zero (the triplet stays, so a later step can revive it, as in the paper).

The budget step runs inside train.py's step (peft.after_step, after the optimizer step and before zero_grad,
where PEFT's `update_and_allocate` must be called by hand), and the regulariser enters train.py's loss through
peft.loss_term (once per optimizer step, divided by the number of ranks so that the ranks' summed gradients hold
it once, as PEFT's DDP mean does). Step numbers count completed optimizer steps 1 .. total_step. The importance
averages are not in train.py's checkpoints: `--resume` continues exactly once the budget is final (the last
tfinal steps, where PEFT resets them too and the pattern is read back from the λ at zero before the first
resumed update: loss_term notes them while no pattern is known); resumed before that,
the averages restart from zero.

The maths and its order follow PEFT 0.21.2's tuners/adalora (RankAllocator), so a run equals PEFT's (tested).
Files: `base_model.model.<path>.lora_A` (r, in), `.lora_B` (out, r), `.lora_E` (r, 1) (ParameterDict
entries: no `.weight`); `ranknum` is not saved (always init_r). After a budget step the config holds
`rank_pattern` {"<path>.lora_E": [bool] * init_r} and the file only the kept triplets, as PEFT saves them.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.distributed as dist

from model import checks

from . import core
from .core import import_state  # noqa: F401  (the package's load uses it)
from .lora import LoraLinear

UNSUPPORTED = ("fan_in_fan_out", "layers_to_transform", "layers_pattern", "alpha_pattern", "modules_to_save",
               "lora_bias", "exclude_modules", "use_dora", "use_rslora")


@dataclass
class AdaLoraConfig:
    peft_type = "ADALORA"
    methods = {"adalora": {"targets": "all-linear"}}  # train.py --method name -> preset fields (see LoraConfig)
    flags = {"adalora_init_r": "init_r", "adalora_target_r": "target_r", "adalora_tinit": "tinit",
             "adalora_tfinal": "tfinal", "adalora_delta_t": "deltaT", "adalora_beta1": "beta1",
             "adalora_beta2": "beta2", "adalora_orth_reg_weight": "orth_reg_weight", "lora_alpha": "alpha",
             "lora_dropout": "dropout", "lora_targets": "targets"}

    init_r: int = 12                  # PEFT's defaults throughout
    target_r: int = 8                 # average rank per matrix at the end of the schedule
    tinit: int = 0                    # steps before the first budget step
    tfinal: int = 0                   # last steps at the final budget
    deltaT: int = 1                   # steps between two budget allocations
    beta1: float = 0.85               # EMA of the sensitivity (Eq. 8)
    beta2: float = 0.85               # EMA of its uncertainty (Eq. 9)
    orth_reg_weight: float = 0.5
    alpha: float = 8.0
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    total_step: int | None = None     # the run's optimizer steps (train.py fills it: peft.start_run)
    rank_pattern: dict | None = None  # after a budget step: "<path>.lora_E" -> [kept?] * init_r
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        for k in ("init_r", "target_r", "deltaT"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) <= 0:
                raise ValueError(f"AdaLoraConfig.{k} must be a positive integer, got {getattr(self, k)!r}")
        if self.target_r > self.init_r:
            raise ValueError(f"AdaLoraConfig.target_r={self.target_r} is above init_r={self.init_r}: the budget "
                             f"only shrinks (target_r <= init_r)")
        for k in ("tinit", "tfinal"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 0:
                raise ValueError(f"AdaLoraConfig.{k} must be an integer >= 0, got {getattr(self, k)!r}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"AdaLoraConfig: beta1, beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        if not 0 <= self.orth_reg_weight < math.inf:
            raise ValueError(f"AdaLoraConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdaLoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.total_step is not None:
            check_schedule(self, self.total_step)

    def to_json(self) -> dict:
        return {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "init_r": self.init_r,
                "target_r": self.target_r, "tinit": self.tinit, "tfinal": self.tfinal, "deltaT": self.deltaT,
                "beta1": self.beta1, "beta2": self.beta2, "orth_reg_weight": self.orth_reg_weight,
                "total_step": self.total_step, "rank_pattern": self.rank_pattern, "r": 8,
                "lora_alpha": self.alpha, "lora_dropout": self.dropout, "target_modules": self.targets,
                "init_lora_weights": True, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                "base_model_name_or_path": self.base_model_name_or_path}

    @classmethod
    def from_json(cls, d: dict, source: str = "adapter_config.json") -> "AdaLoraConfig":
        core.reject_unsupported(d, UNSUPPORTED, source)
        pattern = d.get("rank_pattern")
        if pattern is not None and not (isinstance(pattern, dict) and all(
                isinstance(v, list) and all(isinstance(b, bool) for b in v) for v in pattern.values())):
            raise ValueError(f"{source}: rank_pattern must map module names to lists of true/false")
        steps = {k: d.get(k) or 0 for k in ("tinit", "tfinal")}  # may be 0: not sizes (checked by __post_init__)
        for k, v in steps.items():
            checks.expect(v, int, source, k)
        d = {"lora_alpha": 8, **{k: v for k, v in d.items() if k not in ("rank_pattern", "tinit", "tfinal")}}
        return core.build_config(cls, d, source, {"lora_alpha": "alpha", "lora_dropout": "dropout",
                                                  "target_modules": "targets"}, rank_pattern=pattern, **steps)


def check_schedule(cfg: AdaLoraConfig, total: int):
    """PEFT's rule, as one-line errors: the schedule must leave at least one budget step."""
    if cfg.tfinal >= total:
        raise ValueError(f"AdaLoraConfig.tfinal={cfg.tfinal} is not below the run's {total} steps")
    if cfg.tinit >= total - cfg.tfinal:
        raise ValueError(f"AdaLoraConfig: tinit={cfg.tinit} and tfinal={cfg.tfinal} leave no budget step in "
                         f"{total} steps (need tinit < total steps - tfinal)")


class SVDLinear(core.LinearWrapper):
    """y = W x + b + s/(init_r + 1e-5) * B ((A ⊙ E) dropout(x)),  A = Q, E = λ, B = P (module docstring)."""
    adapter_names = ("lora_A", "lora_B", "lora_E")

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, cfg: AdaLoraConfig, r: int | None = None):
        super().__init__(weight, bias)
        r = cfg.init_r if r is None else r  # fewer when loaded with a rank_pattern
        kw = dict(device=weight.device, dtype=self.adapter_dtype)
        self.lora_A = nn.Parameter(torch.randn(r, self.in_features, **kw) * 0.02)   # (r, in)  right vectors Q
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))                         # (r, 1)   singular values λ
        self.lora_B = nn.Parameter(torch.randn(self.out_features, r, **kw) * 0.02)  # (out, r) left vectors P
        self.ranknum = float(cfg.init_r)   # PEFT keeps the scale of init_r after pruning
        self.scaling = cfg.alpha if cfg.alpha > 0 else float(cfg.init_r)
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)  # (out, in)

    def forward(self, x):
        result = self.base_forward(x)
        if self.merged:
            return result
        x = self.lora_dropout(x).to(self.lora_A.dtype)
        return result + ((x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling
                         / (self.ranknum + 1e-5)).to(result.dtype)

    merge, unmerge = LoraLinear.merge, LoraLinear.unmerge  # W +/- delta_weight(), the same as LoRA's


CONFIGS = (AdaLoraConfig,)


def apply(model: nn.Module, cfg: AdaLoraConfig) -> nn.Module:
    """Swap each target linear for an SVDLinear (with the ranks of cfg.rank_pattern when loading a pruned
    adapter), freeze the rest."""
    names = core.find_targets(model, cfg.targets, "AdaLoraConfig.targets")
    pattern = cfg.rank_pattern or {}
    return core.wrap_targets(model, names, cfg, SVDLinear,
                             extra=lambda n: {"r": sum(pattern[n + ".lora_E"])} if n + ".lora_E" in pattern else {})


def _layers(model) -> dict[str, SVDLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}


def loss_term(model) -> torch.Tensor:
    """orth_reg_weight * mean over every A and B of ||A A^T - I||_F, ||B^T B - I||_F (Eq. 2, PEFT's form), divided
    by the number of data-parallel ranks (each rank adds it; their gradients are summed)."""
    reg, n = 0.0, 0
    for m in _layers(model).values():
        for p in (m.lora_A, m.lora_B):
            cov = p @ p.T if p is m.lora_A else p.T @ p                     # (r, r)
            reg = reg + torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device))
            n += 1
    world = dist.get_world_size() if dist.is_initialized() else 1
    if model.peft_config.rank_pattern is None:  # before the update: which λ a resumed checkpoint holds at 0
        model.__dict__["adalora_kept"] = {n + ".lora_E": (m.lora_E != 0).view(-1).tolist()
                                          for n, m in _layers(model).items()}
    return model.peft_config.orth_reg_weight * (reg / max(n, 1)) / world


def start_run(model, total: int, zero: int) -> str | None:
    """train.py, once the run's step count is known: fill total_step, check the schedule (None: fine)."""
    if zero:
        return "--method adalora: the budget step reads every gradient, which --zero shards: use --zero 0"
    try:
        check_schedule(model.peft_config, total)
    except ValueError as e:
        return str(e)
    model.peft_config.total_step = total
    return None


class RankAllocator:
    """PEFT's RankAllocator: the EMAs of Eqs. (8)-(9) per adapter tensor and the budget of Eq. (12)."""

    def __init__(self, model, cfg: AdaLoraConfig):
        self.cfg = cfg
        self.init_bgt = sum(m.lora_A.shape[0] for m in _layers(model).values())
        self.target_bgt = cfg.target_r * len(_layers(model))
        self.reset_ipt()

    def reset_ipt(self):
        self.exp_avg_ipt, self.exp_avg_unc = {}, {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.cfg
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * (mul ** 3) + self.target_bgt), step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self, model):
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for n, m in _layers(model).items():
            for k in SVDLinear.adapter_names:
                p, key = getattr(m, k), f"{n}.{k}"
                ipt = (p * p.grad).abs()                                    # sensitivity I = |w dL/dw|
                avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                self.exp_avg_ipt[key] = b1 * avg + (1 - b1) * ipt
                self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - self.exp_avg_ipt[key]).abs()

    @torch.no_grad()
    def mask_to_budget(self, model, budget: int) -> dict:
        """Zero the λ of the lowest-scored triplets so that `budget` remain (ties at the threshold go too, as in
        PEFT); returns the rank pattern."""
        s = {k: self.exp_avg_ipt[k] * self.exp_avg_unc[k] for k in self.exp_avg_ipt}   # s(w), per element
        scores = {}
        for n, m in _layers(model).items():
            ab = torch.cat([s[n + ".lora_A"].mean(dim=1, keepdim=True), s[n + ".lora_B"].mean(dim=0).view(-1, 1)], 1)
            scores[n] = (s[n + ".lora_E"].view(-1) + ab.sum(dim=1)).view(-1, 1)          # S_i (r, 1)
        k = self.init_bgt - budget
        if k <= 0:  # nothing to cut (target_r == init_r): every triplet stays
            return {n + ".lora_E": [True] * m.lora_E.shape[0] for n, m in _layers(model).items()}
        threshold = torch.kthvalue(torch.cat([v.view(-1) for v in scores.values()]), k=k)[0].item()
        pattern = {}
        for n, m in _layers(model).items():
            m.lora_E.masked_fill_(scores[n] <= threshold, 0.0)
            pattern[n + ".lora_E"] = (~(scores[n] <= threshold)).view(-1).tolist()
        return pattern


@torch.no_grad()
def after_step(model, step: int):
    """The budget step after optimizer step `step` (1-based), before zero_grad: PEFT's update_and_allocate."""
    cfg = model.peft_config
    if cfg.total_step is None:
        raise ValueError("AdaLoraConfig.total_step is not set (peft.start_run(model, total_steps, zero=0))")
    alloc = model.__dict__.setdefault("adalora_allocator", RankAllocator(model, cfg))
    last = cfg.total_step - cfg.tfinal
    if step < last:
        alloc.update_ipt(model)
        budget, mask = alloc.budget_schedule(step)
        if mask:
            cfg.rank_pattern = alloc.mask_to_budget(model, budget)
    elif step == last:  # the final allocation, kept for the last tfinal steps
        cfg.rank_pattern = alloc.mask_to_budget(model, alloc.budget_schedule(step)[0])
        alloc.reset_ipt()
    else:
        if cfg.rank_pattern is None:  # resumed in the final phase: the λ at 0 before this step (see loss_term)
            cfg.rank_pattern = model.__dict__.pop("adalora_kept")
        for n, m in _layers(model).items():
            keep = torch.tensor(cfg.rank_pattern[n + ".lora_E"], device=m.lora_E.device).view(-1, 1)
            m.lora_E.masked_fill_(~keep, 0.0)


def export_state(model) -> dict:
    """The adapter tensors under PEFT's keys; with a rank pattern only the kept triplets (PEFT's
    resize_state_dict_by_rank_pattern)."""
    sd = core.export_state(model)
    for n, keep in (model.peft_config.rank_pattern or {}).items():
        path = core.PEFT_PREFIX + n.rsplit(".", 1)[0]
        idx = torch.tensor(keep, dtype=torch.bool, device=sd[path + ".lora_A"].device)
        if int(idx.sum()) == sd[path + ".lora_A"].shape[0]:
            continue  # already that size (loaded pruned, or nothing cut)
        sd[path + ".lora_A"], sd[path + ".lora_E"] = sd[path + ".lora_A"][idx], sd[path + ".lora_E"][idx]
        sd[path + ".lora_B"] = sd[path + ".lora_B"][:, idx].contiguous()
    return sd


def merge(model):
    core.call_all(model, SVDLinear, "merge")


def unmerge(model):
    core.call_all(model, SVDLinear, "unmerge")


def unload(model):
    core.unload(model, SVDLinear)
