"""Parity of our decoder with HF transformers on tiny random configs, loaded through our production loader."""
import json

import pytest
import torch

from model import load_pretrained, save_pretrained
from tests.reference import kv_cache_error, padded_batch, run_reference, tiny_hf_config

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
CONFIGS = {
    "llama": tiny_hf_config("llama"),
    "llama-llama3-rope": tiny_hf_config("llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "llama-linear-rope-bias-tied": tiny_hf_config("llama", rope_scaling={"rope_type": "linear", "factor": 2.0},
                                                  attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                                  head_dim=32),
    "qwen2": tiny_hf_config("qwen2"),
    "qwen3": tiny_hf_config("qwen3"),
    "mistral": tiny_hf_config("mistral"),
    "mistral-window": tiny_hf_config("mistral", sliding_window=5),
}


_batch = padded_batch


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """One reference subprocess: builds every tiny HF model (randomised norms/biases), saves it, and records
    its logits with and without padding masks; then loads our saved copies back into transformers."""
    work = tmp_path_factory.mktemp("hf")
    ids, mask = _batch()
    out = run_reference(f"""
        from transformers import AutoConfig, AutoModelForCausalLM
        configs = json.loads({json.dumps(json.dumps(CONFIGS))})
        x = load_file("in.safetensors")
        res = {{}}
        for i, (name, cfg) in enumerate(configs.items()):
            torch.manual_seed(i)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32).eval()
            with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so they are tested
                for n, p in model.named_parameters():
                    if n.endswith("norm.weight") or n.endswith("bias"):
                        p.add_(torch.randn_like(p) * 0.1)
                model.save_pretrained(name)
                res[name + "/plain"] = model(input_ids=x["ids"]).logits
                res[name + "/mask"] = model(input_ids=x["ids"], attention_mask=x["mask"]).logits
        save_file(res, "out.safetensors")
    """, work, {"ids": ids, "mask": mask})
    return work, out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(hf, name):
    work, ref = hf
    ids, mask = _batch()
    ours = load_pretrained(work / name)
    with torch.no_grad():
        got_plain = ours(ids)
        got_mask = ours(ids, attention_mask=mask)
    assert (got_plain - ref[name + "/plain"]).abs().max() <= 1e-5
    keep = mask.bool()  # padded positions are garbage in both and never used
    assert (got_mask - ref[name + "/mask"])[keep].abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral-window"])
def test_kv_cache_generation_equals_full_forward(hf, name):
    assert kv_cache_error(load_pretrained(hf[0] / name)) <= 1e-5


def test_saved_model_loads_in_transformers(hf, tmp_path):
    """Our save_pretrained output (single file and sharded, fp32 and bf16) gives transformers the same logits."""
    work, _ = hf
    ids, _ = _batch()
    want = {}
    for name in ("llama-linear-rope-bias-tied", "qwen3"):
        model = load_pretrained(work / name)
        save_pretrained(model, tmp_path / name, max_shard_bytes=20_000)  # forces several shards
        with torch.no_grad():
            want[name] = model(ids)
    bf16 = load_pretrained(work / "qwen2", dtype=torch.bfloat16)
    save_pretrained(bf16, tmp_path / "qwen2-bf16")
    with torch.no_grad():
        want["qwen2-bf16"] = bf16(ids).float()
    assert (tmp_path / "qwen3" / "model.safetensors.index.json").is_file()
    got = run_reference(f"""
        from transformers import AutoModelForCausalLM
        x = load_file("in.safetensors")
        res = {{}}
        for name in {list(want)!r}:
            dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
            m = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).eval()
            with torch.no_grad():
                res[name] = m(input_ids=x["ids"]).logits.float()
        save_file(res, "out.safetensors")
    """, tmp_path, {"ids": ids})
    for name in want:
        assert (got[name] - want[name]).abs().max() <= (1e-5 if "bf16" not in name else 0), name


def test_gradient_checkpointing_same_gradients(hf):
    model = load_pretrained(hf[0] / "qwen3").train()
    ids, mask = _batch()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(ids, attention_mask=mask).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=0, atol=1e-6), n


def test_block_diagonal_mask_equals_separate_sequences(hf):
    """Packing: two sequences in one row with restarted positions and a block-diagonal causal mask give the
    same logits as running each alone."""
    model = load_pretrained(hf[0] / "llama")
    ids, _ = _batch(T=10)
    a, b = ids[0, :4], ids[1, :6]
    packed = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(4), torch.arange(6)])[None]
    seg = torch.tensor([0] * 4 + [1] * 6)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    mask = (causal & (seg[:, None] == seg[None, :]))[None, None]
    with torch.no_grad():
        got = model(packed, attention_mask=mask, position_ids=pos)[0]
        want = torch.cat([model(a[None])[0], model(b[None])[0]])
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_backward_equals_autograd(dtype):
    """SiluMul (saves g and u only) == autograd through F.silu(g) * u, in value and both gradients."""
    from model.ops import SiluMul
    torch.manual_seed(0)
    g = (3 * torch.randn(4, 33)).to(dtype).requires_grad_()
    u = torch.randn(4, 33).to(dtype).requires_grad_()
    dh = torch.randn(4, 33).to(dtype)
    y = SiluMul.apply(g, u)
    ref = torch.nn.functional.silu(g) * u
    got, want = torch.autograd.grad(y, (g, u), dh), torch.autograd.grad(ref, (g, u), dh)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)  # bf16: one ulp
    assert torch.equal(y, ref)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("lora,amp", [(False, False), (True, False), (True, True)])
def test_recompute_saved_gives_identical_gradients(hf, lora, amp):
    """RecomputeSaved (normed inputs and SwiGLU's product recomputed in backward, not kept) changes no bit of
    the loss or of any gradient: full fine-tuning (plain nn.Linear saves a 2-D view of its input), LoRA (our
    fused function), and LoRA under bf16 autocast."""
    import peft
    model = load_pretrained(hf[0] / "llama").train()
    if lora:
        model = peft.apply(model, peft.LoraConfig(r=4, targets="all-linear"))
        torch.manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p)
    ids, mask = _batch()
    out = []
    for recompute in (False, True):
        model.zero_grad()
        model.recompute_saved = recompute
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(ids, attention_mask=mask).float().logsumexp(-1).mean()
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1].keys() == out[1][1].keys() and len(out[0][1]) > 0
    for n in out[0][1]:
        assert torch.equal(out[0][1][n], out[1][1][n]), n


@pytest.mark.parametrize("lora", [False, True])
def test_recompute_saved_keeps_no_normed_input(hf, lora, monkeypatch):
    """With recompute_saved, no tensor kept for backward shares memory with a normed layer input or SwiGLU's
    product (without it, every one of them is kept)."""
    import peft
    from model import ops as mm
    model = load_pretrained(hf[0] / "llama").train()
    if lora:
        model = peft.apply(model, peft.LoraConfig(r=4, targets="all-linear"))
    outs = []  # strong references: their addresses stay unique during the forward
    handles = []
    for layer in model.model.layers:
        handles.append(layer.input_layernorm.register_forward_hook(lambda m, i, o: outs.append(o)))
        handles.append(layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: outs.append(o)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, i: outs.append(i[0])))  # silu*u
    kept = []
    init = mm.RecomputeSaved.__init__

    def spy(self, out, fn, *inputs, enabled=True):
        init(self, out, fn, *inputs, enabled=enabled)
        pack = self.pack_hook
        self.pack_hook = lambda t: (lambda r: (kept.append(r.untyped_storage().data_ptr())
                                               if isinstance(r, torch.Tensor) else None, r)[1])(pack(t))
    monkeypatch.setattr(mm.RecomputeSaved, "__init__", spy)
    ids, _ = _batch()
    for recompute in (False, True):
        outs.clear(), kept.clear()
        model.recompute_saved = recompute
        loss = model(ids).float().logsumexp(-1).mean()
        shared = {o.untyped_storage().data_ptr() for o in outs} & set(kept)
        assert len(outs) == 3 * len(model.model.layers)
        assert len(shared) == (0 if recompute else len(outs)), (recompute, len(shared))
        loss.backward()
    for h in handles:  # (the hooks would keep graph tensors referenced from the model: a cycle gc can't free)
        h.remove()
    outs.clear()


def test_forward_without_backward_leaks_nothing(hf):
    """A graph that is never backpropagated (an abandoned step) is freed with its model: RecomputeSaved's
    recipes must not form a reference cycle through autograd's C++ nodes, which gc cannot collect."""
    import gc
    import weakref
    import peft
    model = peft.apply(load_pretrained(hf[0] / "llama").train(), peft.LoraConfig(r=4, targets="all-linear"))
    ref = weakref.ref(model.model.layers[0].mlp.down_proj.weight)
    loss = model(_batch()[0]).float().logsumexp(-1).mean()
    del model, loss
    gc.collect()
    assert ref() is None


def test_half_precision_gemm_emulation_equals_a_bf16_gemm():
    """gemm_operand: bf16-rounded operands multiplied in fp32 and rounded back == torch's own bf16 matmul (which
    accumulates in fp32) up to the accumulation order: >= 99% of outputs bit-equal, the rest one bf16 ulp."""
    from model.ops import gemm_operand
    torch.manual_seed(0)
    a, b = torch.randn(64, 300), torch.randn(300, 48)
    native = a.bfloat16() @ b.bfloat16()
    emulated = (gemm_operand(a, torch.bfloat16) @ gemm_operand(b, torch.bfloat16)).bfloat16()
    assert (native == emulated).float().mean() >= 0.99
    ulp = native.float().abs() * 2.0 ** -7
    assert ((native.float() - emulated.float()).abs() <= ulp).all()


def test_bf16_autocast_step_with_emulated_gemms_is_as_accurate_as_native_bf16(hf, monkeypatch):
    """A LoRA forward/backward under bf16 autocast, taking fp32 (no autocast) as the truth: the emulated-GEMM
    path (model.ops.gemm_dtype on a CPU without bf16 units) is as close to it as the native bf16 kernels:
    relative L2 errors of the loss and every adapter gradient, mean within 10% of native's, all < 5%."""
    import peft
    from model import ops
    torch.manual_seed(0)
    model = peft.apply(load_pretrained(hf[0] / "llama").train(), peft.LoraConfig(r=4, targets="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ids, mask = _batch()
    out = {}
    for mode in ("fp32", "emulated", "native"):
        monkeypatch.setattr(ops, "gemm_dtype", (lambda d, dev: d) if mode == "native" else
                            (lambda d, dev: torch.float32 if d == torch.bfloat16 else d))
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            loss = model(ids, attention_mask=mask).float().logsumexp(-1).mean()
        loss.backward()
        out[mode] = {"loss": loss.detach()[None]}
        out[mode].update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(out["fp32"]) == 1 + 2 * 7 * len(model.model.layers)
    err = {m: torch.tensor([((out[m][n] - t).norm() / t.norm()).item() for n, t in out["fp32"].items()])
           for m in ("emulated", "native")}
    assert err["emulated"].mean() <= 1.1 * err["native"].mean(), err  # rounding noise of bf16 on both sides
    assert err["emulated"].max() < 0.05 and err["native"].max() < 0.05, err
