"""Preference-tuning objectives, beside the SFT loss (model/ops.py ChunkedCE): the log-probability of a completion
under the model, and the paired (DPO, IPO, SimPO, ORPO) and unpaired (KTO) losses computed from it.

Notation: for a prompt x and a completion y, logp(y|x) = sum_t log pi(y_t | x, y_<t) over the completion's tokens
(the trained positions of the batch), n(y) its token count; y_w the chosen (preferred), y_l the rejected
completion; pi_theta the model being trained, pi_ref the reference (under PEFT: the same model with the adapter
switched off, peft.disabled). Every loss returns per-example losses (the caller averages over the GLOBAL number
of pairs / examples, like the SFT loss over tokens) and TRL-named rewards for logging.

The log-probs are computed only at completion positions and in chunks (ChunkedLogp), so no (tokens x vocab)
tensor is kept for backward: backward recomputes each chunk's logits once.
"""
import contextlib
import copy as _copy
import math

import torch
import torch.nn.functional as F

from .model import lean_mask
from .ops import gemm_operand


class ChunkedLogp(torch.autograd.Function):
    """log softmax(W h_i)[y_i] for N positions, in chunks of `chunk` rows. d logp_i / d logits_i = onehot(y_i) -
    softmax(logits_i); the upstream gradient g_i is only known in backward, so backward recomputes the chunk's
    logits instead of keeping (N, V) of them. Operands are rounded to `dtype` (the autocast dtype, see
    model/ops.py gemm_operand); logits and log-probs are fp32."""

    @staticmethod
    def forward(ctx, h, w, y, chunk: int, dtype):
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)        # (N,)
        with torch.autocast(h.device.type, enabled=False):
            wc = gemm_operand(w, dtype)
            for i in range(0, h.shape[0], chunk):
                logits = (gemm_operand(h[i:i + chunk], dtype) @ wc.T).float()       # (n, V)
                out[i:i + chunk] = logits.gather(1, y[i:i + chunk, None]).squeeze(1) - torch.logsumexp(logits, -1)
        ctx.save_for_backward(h, w, y)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, g):                                                           # g: (N,)
        h, w, y = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.empty_like(h) if need_h else None                                # (N, D)
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        with torch.autocast(h.device.type, enabled=False):
            wc = gemm_operand(w, ctx.dtype)
            for i in range(0, h.shape[0], ctx.chunk):
                hc, yc, gc = gemm_operand(h[i:i + ctx.chunk], ctx.dtype), y[i:i + ctx.chunk], g[i:i + ctx.chunk]
                d = torch.softmax((hc @ wc.T).float(), -1).neg_()                   # (n, V): -softmax
                d[torch.arange(len(yc), device=d.device), yc] += 1.0                # + onehot
                d = gemm_operand(d.mul_(gc.float()[:, None]), ctx.dtype)
                if need_h:
                    gh[i:i + ctx.chunk] = (d @ wc).to(h.dtype)
                if need_w:
                    gw += (d.T @ hc).float()
        return gh, (gw.to(w.dtype) if need_w else None), None, None, None


def completion_logps(model, batch, device, chunk: int = 256):
    """Summed log-probs of each row's trained tokens (the completion) and their counts: (B,) fp32, (B,) long.
    `batch` is a collated batch (data.collate) whose train_mask marks the completion tokens."""
    ids = batch["input_ids"].to(device)
    am, pos = lean_mask(batch), batch["position_ids"]  # right padding: no mask (model.lean_mask)
    hidden = model(ids, attention_mask=am.to(device) if isinstance(am, torch.Tensor) else am,
                   position_ids=None if pos is None else pos.to(device), hidden_only=True)     # (B, T, D)
    sel = batch["train_mask"][:, 1:].to(device)                                 # (B, T-1): token t+1 is scored
    rows = torch.arange(ids.shape[0], device=device)[:, None].expand_as(sel)[sel]  # (N,) the row of each token
    h, y = hidden[:, :-1][sel], ids[:, 1:][sel]                                 # (N, D), (N,)
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else h.dtype
    tok = ChunkedLogp.apply(h, model.lm_head.weight, y, chunk, dtype)           # (N,)
    sums = torch.zeros(ids.shape[0], dtype=torch.float32, device=device).index_add(0, rows, tok)
    return sums, sel.sum(1)


def dpo(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, eq. 7) with conservative label smoothing eps (cDPO, Mitchell 2023):
        loss = -(1 - eps) log sigma(beta * D) - eps log sigma(-beta * D),
        D = (logp_theta(y_w) - logp_ref(y_w)) - (logp_theta(y_l) - logp_ref(y_l)).
    pc, pr: policy log-probs of chosen / rejected (B,); rc, rr: reference ones. Returns losses, chosen and
    rejected rewards (beta * log-ratio, TRL's rewards/chosen and rewards/rejected)."""
    d = (pc - rc) - (pr - rr)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def robust(pc, pr, rc, rr, beta: float, label_smoothing: float):
    """Robust DPO (Chowdhury et al. 2024, eq. 8): unbiased under preference labels flipped with probability eps,
        loss = ((1 - eps) * -log sigma(beta * D) - eps * -log sigma(-beta * D)) / (1 - 2 eps)   (eps < 1/2)."""
    d = beta * ((pc - rc) - (pr - rr))
    losses = (-(1 - label_smoothing) * F.logsigmoid(d) + label_smoothing * F.logsigmoid(-d)) / (1 - 2 * label_smoothing)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def ipo(pc, pr, rc, rr, nc, nr, beta: float):
    """IPO (Azar et al. 2023, eq. 17): (h - 1 / (2 tau))^2 with tau = beta, where h is the difference of the
    log-ratios, each averaged over its completion's tokens (as TRL does, confirmed with the IPO authors)."""
    h = (pc - rc) / nc.clamp(min=1) - (pr - rr) / nr.clamp(min=1)
    return (h - 1 / (2 * beta)) ** 2, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def simpo(pc, pr, nc, nr, beta: float, gamma: float, label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised:
        loss = -log sigma(beta/|y_w| logp(y_w) - beta/|y_l| logp(y_l) - gamma)  (label smoothing as in cDPO).
    Rewards: beta * the average log-prob of each completion."""
    aw, al = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
    z = beta * (aw - al) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * aw.detach(), beta * al.detach()


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(pc, pr, nc, nr, beta: float):
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4-7), on average log-probs a = logp(y)/|y|:
        L_OR = -log sigma(log odds(y_w) - log odds(y_l)),  log odds(y) = a - log(1 - exp(a)),
    weighted by beta (lambda in the paper). The full ORPO loss adds the SFT loss on the chosen completion
    (the caller's token-mean cross-entropy). Rewards: beta * a."""
    aw, al = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
    log_odds = (aw - al) - (log1mexp(aw) - log1mexp(al))
    return -beta * F.logsigmoid(log_odds), beta * aw.detach(), beta * al.detach()


def kto(logps, ref_logps, desirable, kl, beta: float, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, eq. 7) for unpaired examples with a desirable/undesirable label:
        desirable:   w_d * (1 - sigma(beta * (r - z0)))
        undesirable: w_u * (1 - sigma(beta * (z0 - r))),   r = logp_theta(y|x) - logp_ref(y|x),
    z0 the reference point: the batch's KL estimate, mean(logp_theta(y'|x) - logp_ref(y'|x)) over mismatched
    pairs (x, y') of the same batch, clamped at 0 and not differentiated (`kl`, computed by the caller).
    desirable: (B,) bool. Returns losses (B,) and rewards beta * r (B,)."""
    r = logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - r))))
    return losses, beta * r.detach()


def reference(model, device, copy: bool = False, disabled=None):
    """batch -> the reference model's completion log-probs (B,), without gradients: `batch["ref_logps"]` when
    precomputed, else the model inside `disabled(model)` (peft.disabled: the adapter switched off, no second copy)
    or, with copy=True (full fine-tuning), a frozen copy of the model as it is now, before training."""
    ref = _copy.deepcopy(model).requires_grad_(False) if copy else model

    @torch.no_grad()
    def logps(batch):
        if "ref_logps" in batch:
            return batch["ref_logps"].to(device)
        with disabled(model) if disabled is not None else contextlib.nullcontext():
            return completion_logps(ref, batch, device)[0]
    return logps


REFERENCE_FREE = ("simpo", "orpo")  # --pref-loss values that need no reference model


def rows(batch: dict, a: int, b: int) -> dict:
    """Rows [a, b) of a collated batch (its (B, T) tensors; the rest as is)."""
    return {k: v[a:b] if torch.is_tensor(v) and v.dim() == 2 else v for k, v in batch.items()}


def loss_sum(model, batch, device, cfg, reference):
    """Sum of this micro-batch's per-pair (DPO stage) or per-example (KTO stage) losses, and sums of the logged
    metrics (TRL's names). train.py divides both by the global pair / example count, as the SFT loss by the
    global token count. reference(batch) -> the reference model's completion log-probs of every row (B,), under
    no_grad. cfg: train.py's config (stage, pref_loss, beta, label_smoothing, simpo_gamma, kto_*_weight)."""
    if "pairs" in batch:
        lp, n = completion_logps(model, batch, device)                          # (2P,), (2P,)
        n = n.to(lp.dtype)
        p = batch["pairs"]
        pc, pr, nc, nr = lp[:p], lp[p:], n[:p], n[p:]
        ref = None if cfg.pref_loss in REFERENCE_FREE else reference(batch)
        if cfg.pref_loss == "sigmoid":
            losses, rw, rl = dpo(pc, pr, ref[:p], ref[p:], cfg.beta, cfg.label_smoothing)
        elif cfg.pref_loss == "robust":
            losses, rw, rl = robust(pc, pr, ref[:p], ref[p:], cfg.beta, cfg.label_smoothing)
        elif cfg.pref_loss == "ipo":
            losses, rw, rl = ipo(pc, pr, ref[:p], ref[p:], nc, nr, cfg.beta)
        elif cfg.pref_loss == "simpo":
            losses, rw, rl = simpo(pc, pr, nc, nr, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)
        else:  # orpo: the SFT term is the chosen completion's token-mean NLL (the paper's L_SFT, eq. 2)
            losses, rw, rl = orpo(pc, pr, nc, nr, cfg.beta)
            losses = losses - pc / nc.clamp(min=1)
        return losses.sum(), {"rewards/chosen": rw.sum(), "rewards/rejected": rl.sum(),
                              "rewards/margins": (rw - rl).sum(), "rewards/accuracies": (rw > rl).float().sum(),
                              "logps/chosen": pc.detach().sum(), "logps/rejected": pr.detach().sum()}
    k = batch["examples"]  # KTO: rows [0, k) are the examples, [k, 2k) the mismatched KL rows
    lp, _ = completion_logps(model, rows(batch, 0, k), device)                  # (k,)
    with torch.no_grad():  # the KL rows get no gradient: a forward of their own, no graph kept for them
        ref = reference(batch)                                                  # (2k,)
        # z0: the KL rows' mean log-ratio, per micro-batch, clamped at 0 and not differentiated
        kl = (completion_logps(model, rows(batch, k, 2 * k), device)[0] - ref[k:]).mean().clamp(min=0)
    desirable = batch["desirable"].to(device)
    losses, r = kto(lp, ref[:k], desirable, kl, cfg.beta, cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
    # TRL's KTO rewards are means over the desirable / undesirable examples: "_n/" sums are those counts
    return losses.sum(), {"rewards/chosen": r[desirable].sum(), "rewards/rejected": r[~desirable].sum(), "kl": kl * k,
                          "_n/rewards/chosen": desirable.sum(), "_n/rewards/rejected": (~desirable).sum()}
