"""model/preference.py: the chunked completion log-probs against autograd on full logits, and the preference losses
against TRL's own loss code (CPOTrainer.cpo_loss for SimPO and reference-free sigmoid, ORPOTrainer.odds_ratio_loss,
run in a subprocess outside the repo, where HF PEFT is not shadowed) or the paper's equation where TRL computes
the loss inline in its trainer (DPO, IPO, KTO: their full-trainer parity is a train.py-level test)."""
import math

import pytest
import torch
import torch.nn.functional as F

import model as M
from model import preference as P
from tests.reference import run_reference
from tests.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_chunked_logp_equals_autograd_on_full_logits():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(50, 16, generator=g).requires_grad_()
    y = torch.randint(0, 50, (37,), generator=g)
    up = torch.randn(37, generator=g)                     # an arbitrary upstream gradient per token
    got = P.ChunkedLogp.apply(h, w, y, 8, torch.float32)  # 8 rows per chunk: 5 chunks, the last one short
    (got * up).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = F.log_softmax(h @ w.T, -1).gather(1, y[:, None]).squeeze(1)
    (want * up).sum().backward()
    assert (got - want).abs().max() < 1e-5
    assert (gh - h.grad).abs().max() < 1e-5 and (gw - w.grad).abs().max() < 1e-5


def test_completion_logps_sums_the_trained_tokens_of_each_row():
    m = M.Transformer(M.ModelConfig.from_hf(tiny_config()))
    m.init_weights(0.1, 3)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 0, 0], [3, 44, 8, 12, 120, 7, 6, 90]])
    am = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])
    train = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    batch = {"input_ids": ids, "attention_mask": am, "position_ids": None, "train_mask": train}
    got, n = P.completion_logps(m, batch, torch.device("cpu"), chunk=3)
    lp = F.log_softmax(m(ids, attention_mask=am).float(), -1)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    want = (lp * train[:, 1:]).sum(1)
    assert n.tolist() == [3, 6]
    assert (got - want).abs().max() < 1e-5


def batch_logps(seed=0, B=6):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-(torch.rand(B, generator=g) * 30 + 1) for _ in range(4))
    nc, nr = torch.randint(1, 20, (B,), generator=g), torch.randint(1, 20, (B,), generator=g)
    return pc, pr, rc, rr, nc, nr


def test_dpo_and_ipo_follow_the_papers_equations():
    pc, pr, rc, rr, nc, nr = batch_logps()
    beta, eps = 0.1, 0.2
    losses, rw, rl = P.dpo(pc, pr, rc, rr, beta, eps)
    for i in range(len(pc)):  # eq. 7, one pair at a time, in plain floats
        d = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        want = -(1 - eps) * math.log(1 / (1 + math.exp(-d))) - eps * math.log(1 / (1 + math.exp(d)))
        assert abs(losses[i].item() - want) < 1e-5
    assert torch.allclose(rw - rl, beta * ((pc - rc) - (pr - rr)))
    losses, _, _ = P.ipo(pc, pr, rc, rr, nc, nr, beta)
    for i in range(len(pc)):
        h = ((pc[i] - rc[i]) / nc[i] - (pr[i] - rr[i]) / nr[i]).item()
        assert abs(losses[i].item() - (h - 1 / (2 * beta)) ** 2) < 1e-4


def test_kto_follows_the_papers_equation():
    pc, _, rc, _, _, _ = batch_logps(1)
    desirable = torch.tensor([True, False, True, True, False, False])
    kl, beta = torch.tensor(0.3), 0.2
    losses, rewards = P.kto(pc, rc, desirable, kl, beta, 1.0, 1.5)
    for i in range(6):
        r = (pc[i] - rc[i]).item()
        z = beta * (r - 0.3) if desirable[i] else beta * (0.3 - r)
        want = (1.0 if desirable[i] else 1.5) * (1 - 1 / (1 + math.exp(-z)))
        assert abs(losses[i].item() - want) < 1e-6
    assert torch.allclose(rewards, beta * (pc - rc))


TRL_LOSSES = """
import types, torch
from safetensors.torch import load_file, save_file
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
t = load_file("in.safetensors")
acc = types.SimpleNamespace(device=torch.device("cpu"))
out = {}
for name, loss_type, eps in (("simpo", "simpo", 0.0), ("simpo_ls", "simpo", 0.1), ("sigmoid_ls", "sigmoid", 0.1)):
    self = types.SimpleNamespace(alpha=0.0, beta=2.0, loss_type=loss_type, label_smoothing=eps, simpo_gamma=0.5,
                                 accelerator=acc)
    lp = (t["pc"] / t["nc"], t["pr"] / t["nr"]) if loss_type == "simpo" else (t["pc"], t["pr"])
    losses, cr, rr = CPOTrainer.cpo_loss(self, *lp)
    out.update({name: losses, name + "_chosen": cr, name + "_rejected": rr})
self = types.SimpleNamespace(beta=0.1, accelerator=acc)
losses, cr, rr, _, _ = ORPOTrainer.odds_ratio_loss(self, t["pc"] / t["nc"], t["pr"] / t["nr"])
out.update({"orpo": losses, "orpo_chosen": cr, "orpo_rejected": rr})
save_file({k: v.contiguous() for k, v in out.items()}, "out.safetensors")
"""


def test_simpo_orpo_and_smoothed_sigmoid_equal_trl(tmp_path):
    pc, pr, _, _, nc, nr = batch_logps(2)
    pc[0] = -0.01  # an average log-prob above -ln 2: the other branch of log1mexp
    ref = run_reference(TRL_LOSSES, tmp_path, {"pc": pc, "pr": pr, "nc": nc.float(), "nr": nr.float()})
    zero = torch.zeros_like(pc)
    cases = {"simpo": P.simpo(pc, pr, nc, nr, 2.0, 0.5), "simpo_ls": P.simpo(pc, pr, nc, nr, 2.0, 0.5, 0.1),
             # CPO's sigmoid is DPO without a reference model: our dpo with zero reference log-probs
             "sigmoid_ls": P.dpo(pc, pr, zero, zero, 2.0, 0.1), "orpo": P.orpo(pc, pr, nc, nr, 0.1)}
    for name, (losses, cr, rr) in cases.items():
        want = -ref[name] if name == "orpo" else ref[name]  # TRL's ORPO returns beta*log sigma, subtracted later
        assert (losses - want).abs().max() < 1e-6, name
        assert (cr - ref[name + "_chosen"]).abs().max() < 1e-6 and (rr - ref[name + "_rejected"]).abs().max() < 1e-6
