"""Sparse mixture-of-experts feed-forward blocks: Mixtral (Jiang et al. 2024, "Mixtral of Experts") and Qwen2-MoE /
Qwen3-MoE, matching transformers number for number.

Router (Shazeer et al. 2017; Fedus et al. 2021, "Switch Transformers"), per token x:
    p = softmax(W_g x)                       (E,) in fp32
    (w, e) = top-k of p                      Mixtral always, Qwen with norm_topk_prob: w / sum(w)
    y = sum_j w_j * Expert_{e_j}(x)          each expert a SwiGLU MLP
Qwen2-MoE adds a dense shared expert gated per token: y += sigmoid(w_s . x) * Shared(x).

Experts are separate nn.Linear modules under the checkpoints' own names (Mixtral `block_sparse_moe.experts.<j>.w1/w2/
w3`, Qwen `mlp.experts.<j>.gate_proj/up_proj/down_proj`), the layout transformers writes with save_pretrained, so
checkpoints load and save 1:1 and every PEFT method (LoRA, QLoRA, IA3, ...) reaches experts by the same names.
(In memory, transformers 5 fuses them into 3-D tensors; its conversion mapping splits them back on save.)

Dispatch: the (token, slot) pairs are sorted by expert once, the experts run on their contiguous slices, and a
single index_add scatters the weighted outputs back (transformers' loop re-scans a one-hot mask per expert). With
plain nn.Linear experts (full fine-tuning, frozen experts) on the CPU, in one process, outside autocast, the
experts' weights are stacked and all slices run in three grouped matmuls (`torch._grouped_mm`: gate, up, down; the
loop's products bit for bit, somewhat faster: README, Benchmarks; the stacked copies live until backward); a
wrapped expert (LoRA, IA3, NF4, ...) keeps the loop of module calls, so every PEFT method sees its module. Every
expert runs, an empty slice included, so each parameter gets a gradient (zero when unused): data-parallel
reductions and ZeRO buckets (one per decoder block) see the same set of gradients on every rank and step.

The router's auxiliary load-balancing loss (Switch Transformers, eq. 4-6) is `load_balancing_loss`, from the router
logits each block keeps from its last forward (`router_logits`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Router(nn.Module):
    """The gate W_g (E, D), as transformers 5's TopKRouter: a weight, not an nn.Linear, so LoRA's "all-linear"
    leaves it alone on both sides (and adapters stay loadable in HF PEFT)."""

    def __init__(self, d: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        return F.linear(x, self.weight)                      # (N, E)


class ExpertMLP(nn.Module):
    """down(act(gate x) * up x) under Qwen's names (an expert, or the shared expert)."""

    def __init__(self, d: int, h: int, act):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)
        self.act = act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MixtralExpert(nn.Module):
    """w2(act(w1 x) * w3 x): the same MLP under Mixtral's names (w1 gate, w3 up, w2 down)."""

    def __init__(self, d: int, h: int, act):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)
        self.act = act

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    def __init__(self, cfg, act):
        super().__init__()
        d, E = cfg.hidden_size, cfg.num_experts
        self.top_k, self.n_experts = cfg.num_experts_per_tok, E
        self.mixtral = cfg.model_type == "mixtral"
        self.norm_topk = self.mixtral or cfg.norm_topk_prob
        self.gate = Router(d, E)
        expert = MixtralExpert if self.mixtral else ExpertMLP
        self.experts = nn.ModuleList(expert(d, cfg.moe_intermediate_size, act) for _ in range(E))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = ExpertMLP(d, cfg.shared_expert_intermediate_size, act)
            self.shared_expert_gate = nn.Linear(d, 1, bias=False)
        self.router_logits = None  # (N, E) of the last forward, for load_balancing_loss

    def forward(self, x, recompute: bool = False):
        B, T, D = x.shape
        x = x.reshape(-1, D)                                         # (N, D)
        logits = self.gate(x)                                        # (N, E)
        self.router_logits = logits
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        w, e = torch.topk(probs, self.top_k, dim=-1)                 # (N, k)
        if self.norm_topk:
            w = w / w.sum(dim=-1, keepdim=True)
        if not self.mixtral:  # Qwen rounds the weights to the activations' dtype; Mixtral keeps them fp32
            w = w.to(logits.dtype)
        # sort the N*k (token, slot) pairs by expert: each expert's tokens are one contiguous slice
        order = e.reshape(-1).argsort(stable=True)                   # (N*k,)
        counts = torch.bincount(e.reshape(-1), minlength=self.n_experts).tolist()
        token = order // self.top_k                                  # (N*k,) the token of each sorted pair
        xs = x[token]                                                # (N*k, D)
        if self.grouped and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and not _distributed():
            ys = self._grouped(xs, counts)
        else:
            ys = torch.cat([ex(part) for ex, part in zip(self.experts, xs.split(counts))])
        ys = ys * w.reshape(-1)[order, None]                         # (N*k, D) weighted, fp32 for Mixtral
        out = torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(B, T, D)


    @property
    def grouped(self) -> bool:
        """Whether every expert projection is a plain nn.Linear (no adapter or quantized layer in the way)."""
        return all(type(m) is nn.Linear for ex in self.experts for m in ex.children())

    def _grouped(self, xs, counts):
        """The experts' SwiGLU over the sorted slices in two grouped matmuls. xs: (N*k, D), counts: (E,)."""
        names = ("w1", "w3", "w2") if self.mixtral else ("gate_proj", "up_proj", "down_proj")
        offs = torch.tensor(counts, device=xs.device).cumsum(0).to(torch.int32)  # (E,) each slice's end

        def mm(a, n):  # a: (N*k, in) @ every expert's n.weight^T (E, in, out); gate and up stay two products so
            w = torch.stack([getattr(ex, n).weight for ex in self.experts])  # that xs's gradient sums as the loop's
            return torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
        return mm(self.experts[0].act(mm(xs, names[0])) * mm(xs, names[1]), names[2])  # (N*k, D)


def _distributed() -> bool:
    # ZeRO-3 frees a block's gathered weights after its forward: a stacked copy saved for backward would keep them
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def load_balancing_loss(router_logits: list, n_experts: int, top_k: int, attention_mask=None):
    """Switch Transformers' auxiliary loss (Fedus et al. 2021, eq. 4-6) as transformers 5 computes it:
        E * sum_i f_i * P_i
    f_i: top-k assignments to expert i per token, P_i: mean router probability of expert i, both over every MoE
    layer's tokens (padding excluded when a (B, T) attention_mask is given)."""
    if not router_logits:
        return torch.zeros(())
    dev = router_logits[0].device
    counts = torch.zeros(n_experts, dtype=torch.float32, device=dev)
    prob_sum = torch.zeros(n_experts, dtype=torch.float32, device=dev)
    rows = 0.0
    keep = None if attention_mask is None else attention_mask.reshape(-1).to(device=dev, dtype=torch.float32)
    for logits in router_logits:
        p = F.softmax(logits, dim=-1)
        _, chosen = torch.topk(p, top_k, dim=-1)                      # (N, k)
        ones = torch.ones(chosen.numel(), device=dev) if keep is None else keep.repeat_interleave(top_k)
        counts = counts + torch.zeros(n_experts, device=dev).scatter_add_(0, chosen.reshape(-1), ones)
        prob_sum = prob_sum + (p.float() if keep is None else p.float() * keep[:, None]).sum(dim=0)
        rows = rows + (p.shape[0] if keep is None else keep.sum())
    return torch.sum((counts / rows) * (prob_sum / rows)) * n_experts


def aux_loss(model: nn.Module, attention_mask=None):
    """The routers' load-balancing loss of `model`'s last forward (transformers' `aux_loss` with
    output_router_logits), 0 for a dense model. attention_mask: that forward's (B, T) padding mask, if any
    (a packed (B, 1, T, S) mask has no padding)."""
    # duck-typed: a PEFT wrapper around a SparseMoE (MAM's parallel adapter) passes its router_logits on
    logits = [m.router_logits for m in model.modules() if getattr(m, "router_logits", None) is not None]
    if not logits:
        return 0.0
    mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    if mask is not None and logits[0].shape[0] > mask.numel():  # prompt tuning's virtual tokens lead each row,
        B = mask.shape[0]                                       # always attended (PEFT's prefix_attention_mask)
        mask = torch.cat([mask.new_ones(B, logits[0].shape[0] // B - mask.shape[1]), mask], dim=1)
    return load_balancing_loss(logits, model.cfg.num_experts, model.cfg.num_experts_per_tok, mask)


def router_loss(model: nn.Module, attention_mask=None):
    """What the training loss adds per trained token: router_aux_loss_coef * aux_loss when config.json's
    output_router_logits is on (transformers' forward adds it to the loss then), else 0."""
    cfg = model.cfg
    return cfg.router_aux_loss_coef * aux_loss(model, attention_mask) if cfg.output_router_logits else 0.0
