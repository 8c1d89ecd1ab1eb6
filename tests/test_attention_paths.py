"""The attention paths without a dense mask (model.ops.attention, model.lean_mask) equal the dense-mask path they
replace: packed rows as Segments, right-padded batches with no mask, KV-cache decoding and prefix tuning with
causal attention aligned to the last key, left-padded generation, on GQA and MHA configs (and Gemma 2's
soft-capping / windows, Mistral's window). Logits at real positions and the gradients of the trained-token loss
agree to <= 1e-5 in fp32."""
import numpy as np
import pytest
import torch

import data
import model as M
import peft
from data.encode import Example
from tests.reference import padded_batch, tiny_hf_config

TOL = 1e-5
CONFIGS = {
    "gqa": tiny_hf_config("llama"),
    "mha": tiny_hf_config("llama", num_key_value_heads=4),
    "mistral-window": tiny_hf_config("mistral", sliding_window=6),
    "gemma2": tiny_hf_config("gemma2", hidden_activation="gelu_pytorch_tanh", head_dim=16, query_pre_attn_scalar=24,
                             sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=1.5),
}


def tiny(name, seed=0):
    return M.Transformer(M.ModelConfig.from_hf(CONFIGS[name])).init_weights(0.1, seed)


def packed_batch(lengths=((5, 9, 3), (11, 2), (7,)), pad=0):
    """data.collate of packed rows of uneven lengths (row 2 is right-padded), every token after the first trained."""
    g = np.random.default_rng(0)
    rows = []
    for lens in lengths:
        ids = np.concatenate([g.integers(3, 128, n) for n in lens]).astype(np.int32)
        seg = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lens)])
        train = np.concatenate([np.r_[False, np.ones(n - 1, bool)] for n in lens])
        rows.append(Example(ids, train, seg=seg))
    return data.collate(rows, pad)


def loss_and_grads(model, batch, mask):
    """Logits (B, T, V) and the gradients of the trained-token loss sum, with `mask` as the attention mask."""
    model.zero_grad(set_to_none=True)
    logits = model(batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"])
    sel = batch["train_mask"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][sel], batch["input_ids"][:, 1:][sel], reduction="sum")
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, valid):
    (la, ga), (lb, gb) = a, b
    assert (la - lb)[valid].abs().max() <= TOL
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert (ga[n] - gb[n]).abs().max() <= TOL, n


@pytest.mark.parametrize("branch", ["loop", "one masked call"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_rows_without_the_mask(name, branch, monkeypatch):
    """Both CPU branches of packed attention (the per-example loop, one SDPA call with Segments' own mask) equal the
    batch's dense mask."""
    monkeypatch.setattr(M.ops, "LOOP_PAIRS_PER_CALL", 0 if branch == "loop" else float("inf"))
    model = tiny(name)
    b = packed_batch()
    segs = M.lean_mask(b)
    assert isinstance(segs, M.ops.Segments) and segs.lens == [[5, 9, 3], [11, 2, 4], [7, 10]]
    valid = b["attention_mask"][:, 0].diagonal(dim1=-2, dim2=-1)                  # (B, T) real tokens
    assert torch.equal(segs.dense("cpu")[:, 0][valid], b["attention_mask"][:, 0][valid])  # what each real query sees
    assert_same(loss_and_grads(model, b, segs), loss_and_grads(model, b, b["attention_mask"]), valid)


def test_packed_pad_rows_finite():
    logits, _ = loss_and_grads(tiny("gqa"), packed_batch(), M.lean_mask(packed_batch()))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_right_padding_needs_no_mask(name):
    model = tiny(name)
    ids, mask = padded_batch()
    mask = mask[[0, 2]]
    ids = ids[[0, 2]]
    train = mask.bool() & (torch.arange(ids.shape[1]) > 0)
    b = {"input_ids": ids, "attention_mask": mask, "position_ids": None, "train_mask": train}
    assert M.lean_mask(b) is None
    out = loss_and_grads(model, b, None)
    assert torch.isfinite(out[0]).all()
    assert_same(out, loss_and_grads(model, b, mask), mask.bool())
    left = {**b, "attention_mask": padded_batch()[1][[1]]}  # a left-padded row keeps its mask
    assert M.lean_mask(left) is left["attention_mask"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_without_a_mask(name):
    """KV-cache decoding (prefill then T = 1 steps) with no mask equals the dense causal mask over past + new."""
    model = tiny(name)
    ids = padded_batch(10)[0]
    with torch.no_grad():
        for masked in (False, True):
            cache, out = M.KVCache(model.cfg.num_hidden_layers), []
            for s, e in ((0, 6), (6, 8), *((t, t + 1) for t in range(8, 10))):  # prefill, T = 2 (lower right), T = 1
                am = torch.ones(3, e, dtype=torch.long) if masked else None  # all ones: the dense path
                out.append(model(ids[:, s:e], attention_mask=am, cache=cache))
            out = torch.cat(out, 1)
            if not masked:
                fast = out
        assert (fast - out).abs().max() <= TOL
        assert (fast - model(ids)).abs().max() <= TOL


@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_left_padded_generation(name):
    """Left-padded rows keep their mask through prefill and decode; equal to each row run alone, unpadded."""
    model = tiny(name)
    ids, mask = padded_batch(10)
    with torch.no_grad():
        cache = M.KVCache(model.cfg.num_hidden_layers)
        first = model(ids[:, :7], attention_mask=mask[:, :7], cache=cache)
        step = model(ids[:, 7:8], attention_mask=mask[:, :8], cache=cache)[1, -1]
        alone = model(ids[1:2, 4:8])[0]
    assert (first[1, 4:] - alone[:3]).abs().max() <= TOL
    assert (step - alone[3]).abs().max() <= TOL


@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_prefix_tuning_without_a_mask(name):
    base = tiny(name)
    model = peft.apply(base, peft.method_config("prefix", {"num_virtual_tokens": 5}, ""))
    ids = padded_batch()[0]
    b = {"input_ids": ids, "attention_mask": None, "position_ids": None,
         "train_mask": torch.arange(ids.shape[1]).expand_as(ids) > 0}
    ones = torch.ones_like(ids)  # an all-ones padding mask: today's dense (B, 1, T, P + T) path
    assert_same(loss_and_grads(model, b, None), loss_and_grads(model, b, ones), ones.bool())


def test_packed_branch_choice(monkeypatch):
    """The CPU picks the loop for long examples and one masked call for short ones (Segments.loop_pays), and the two
    agree on the same rows: outputs and q/k/v gradients <= 1e-5, GQA and MHA."""
    short, long = M.ops.Segments([[40, 64, 24], [18, 32, 78]]), M.ops.Segments([[650, 686, 297, 415]])
    assert not short.loop_pays() and long.loop_pays()
    assert short.avoided == 2 * 128 ** 2 - sum(n * n for n in (40, 64, 24, 18, 32, 78)) and short.calls == 6
    g = torch.Generator().manual_seed(0)
    for segs in (short, M.ops.Segments([[300, 212], [512]])):
        B, T = len(segs.lens), segs.T
        for kv in (2, 4):
            qkv = [torch.randn(B, h, T, 16, generator=g, requires_grad=True) for h in (4, kv, kv)]
            w = torch.randn(B, 4, T, 16, generator=g)
            outs = []
            for pairs in (0, float("inf")):  # loop, then one masked call
                monkeypatch.setattr(M.ops, "LOOP_PAIRS_PER_CALL", pairs)
                y = M.ops.attention(*qkv, segs)
                outs.append([y.detach(), *torch.autograd.grad((y * w).sum(), qkv)])
            for a, b in zip(*outs):
                assert (a - b).abs().max() <= TOL
