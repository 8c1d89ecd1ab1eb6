"""Parity with transformers for the architectures beyond LLaMA/Qwen (Gemma 1/2/3, Phi-3, Mixtral, Qwen2-MoE,
Qwen3-MoE) and the RoPE scalings (yarn, dynamic NTK, longrope), on tiny random configs: logits with and without
padding, KV-cache decoding, save/load both ways, MoE router logits and aux loss, a Gemma 2 fine-tuning curve."""
import json

import pytest
import torch

import model as nt
from model import load_pretrained, save_pretrained
from tests.reference import kv_cache_error, kv_cache_logits, padded_batch, run_reference, tiny_hf_config

T = 12
MOE = dict(num_experts_per_tok=2, router_aux_loss_coef=0.02)
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.7], "long_factor": [1.0, 2.0, 3.5, 5.0]}
CONFIGS = {
    "gemma": tiny_hf_config("gemma", hidden_act="gelu_pytorch_tanh", head_dim=16),
    # soft-capping small enough to bite; a window of 4 < T on every other layer
    "gemma2": tiny_hf_config("gemma2", hidden_activation="gelu_pytorch_tanh", head_dim=16, query_pre_attn_scalar=24,
                             sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=1.5,
                             tie_word_embeddings=True),
    "gemma3_text": tiny_hf_config("gemma3_text", hidden_activation="gelu_pytorch_tanh", head_dim=16,
                                  query_pre_attn_scalar=16, sliding_window=4, final_logit_softcapping=2.0,
                                  layer_types=["sliding_attention", "full_attention"],
                                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 100000.0},
                                                   "sliding_attention": {"rope_type": "default",
                                                                         "rope_theta": 10000.0}}),
    "phi3": tiny_hf_config("phi3", sliding_window=None),
    # partial rotary (8 of 16 dims) and LongRoPE; T > original_max_position_embeddings: the long factors
    "phi3-longrope": tiny_hf_config("phi3", partial_rotary_factor=0.5, rope_scaling=LONGROPE,
                                    original_max_position_embeddings=8, max_position_embeddings=32),
    "mixtral": tiny_hf_config("mixtral", num_local_experts=4, **MOE),
    "qwen2_moe": tiny_hf_config("qwen2_moe", num_experts=4, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, mlp_only_layers=[1], **MOE),
    "qwen3_moe": tiny_hf_config("qwen3_moe", num_experts=4, moe_intermediate_size=32, head_dim=24,
                                norm_topk_prob=True, **MOE),
    # positions past the original context: 0..11 against 8
    "llama-yarn": tiny_hf_config("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 8},
                                 max_position_embeddings=32),
    "llama-yarn-mscale": tiny_hf_config("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 16,
                                                               "mscale": 0.9, "mscale_all_dim": 0.5,
                                                               "original_max_position_embeddings": 8},
                                        max_position_embeddings=32),
    "llama-dynamic": tiny_hf_config("llama", rope_scaling={"rope_type": "dynamic", "factor": 3.0},
                                    max_position_embeddings=8),
}
MOES = ("mixtral", "qwen2_moe", "qwen3_moe")
KV = ("gemma", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "llama-yarn", "llama-yarn-mscale")
# scalings that depend on the sequence length (longrope's short/long factors, dynamic NTK's base): the keys cached
# before the original context is passed keep their rotation, in transformers too, so cached decoding across it is not
# one full forward; it is compared with transformers' cached decoding instead (and longrope: a prefill past it == full)
KV_HF = ("phi3-longrope", "llama-dynamic")


_batch = padded_batch


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """One reference subprocess: builds every tiny HF model (norms, biases and routers randomised), saves it, and
    records its logits with and without padding, and for MoE the router logits and aux loss."""
    work = tmp_path_factory.mktemp("hf_archs")
    ids, mask = _batch()
    out = run_reference(f"""
        from transformers import AutoConfig, AutoModelForCausalLM
        configs = json.loads({json.dumps(json.dumps(CONFIGS))})
        x = load_file("in.safetensors")
        res = {{}}
        for i, (name, cfg) in enumerate(configs.items()):
            torch.manual_seed(i)
            config = AutoConfig.for_model(**cfg)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            with torch.no_grad():  # HF inits norms to 1 (0 for Gemma) and biases to 0: randomise them
                for n, p in model.named_parameters():
                    if "norm" in n or n.endswith("bias") or n.endswith("gate.weight"):
                        p.add_(torch.randn_like(p) * 0.1)
                model.save_pretrained(name)
                for tag, m in (("plain", None), ("mask", x["mask"])):
                    moe = {{"output_router_logits": True}} if name in {list(MOES)!r} else {{}}
                    o = model(input_ids=x["ids"], attention_mask=m, **moe)
                    res[f"{{name}}/{{tag}}"] = o.logits
                    if moe:
                        res[f"{{name}}/{{tag}}/aux"] = o.aux_loss.reshape(1)
                        if m is not None:  # the training loss: CE + router_aux_loss_coef * aux_loss
                            res[f"{{name}}/loss"] = model(input_ids=x["ids"], attention_mask=m, labels=x["labels"],
                                                          **moe).loss.reshape(1)
                        for j, r in enumerate(o.router_logits):
                            res[f"{{name}}/{{tag}}/router{{j}}"] = r
                if name in {list(KV_HF)!r}:  # cached decoding: a prefill of 6 tokens, then one at a time
                    o = model(input_ids=x["ids"][:, :6], use_cache=True)
                    steps = [o.logits]
                    for t in range(6, x["ids"].shape[1]):
                        o = model(input_ids=x["ids"][:, t:t + 1], past_key_values=o.past_key_values, use_cache=True)
                        steps.append(o.logits)
                    res[f"{{name}}/kv"] = torch.cat(steps, 1)
        save_file(res, "out.safetensors")
    """, work, {"ids": ids, "mask": mask, "labels": ids.masked_fill(~_trained(mask), -100)})
    return work, out


def _trained(mask):
    trained = mask.bool()
    trained[1, 4] = False  # the left-padded row's first token: only a pad position would predict it
    return trained


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(hf, name):
    work, ref = hf
    ids, mask = _batch()
    ours = load_pretrained(work / name)
    with torch.no_grad():
        got_plain = ours(ids)
        got_mask = ours(ids, attention_mask=mask)
    keep = mask.bool()  # padded positions are garbage in both and never used
    err = (got_plain - ref[name + "/plain"]).abs().max(), (got_mask - ref[name + "/mask"])[keep].abs().max()
    print(f"{name}: logits max-abs {err[0]:.1e} (no mask), {err[1]:.1e} (padding)")
    assert max(err) <= 1e-5


@pytest.mark.parametrize("name", MOES)
def test_router_logits_and_aux_loss_match_transformers(hf, name):
    work, ref = hf
    ids, mask = _batch()
    ours = load_pretrained(work / name)
    n_moe = len(ours.cfg.moe_layers)
    assert n_moe == (1 if name == "qwen2_moe" else 2)  # qwen2_moe: layer 1 is in mlp_only_layers
    for tag, m in (("plain", None), ("mask", mask)):
        with torch.no_grad():
            ours(ids, attention_mask=m)
            aux = nt.aux_loss(ours, m)
        blocks = [b for b in ours.modules() if isinstance(b, nt.model.SparseMoE)]
        assert len(blocks) == n_moe
        keep = (m if m is not None else torch.ones_like(ids)).reshape(-1).bool()  # padded rows: garbage in both
        for j, b in enumerate(blocks):
            assert (b.router_logits - ref[f"{name}/{tag}/router{j}"])[keep].abs().max() <= 1e-6
        assert abs(float(aux) - float(ref[f"{name}/{tag}/aux"])) <= 1e-6
        assert float(nt.router_loss(ours, m)) == 0.0  # output_router_logits is off in config.json, as in HF training


@pytest.mark.parametrize("name", MOES)
def test_training_loss_with_router_aux_loss_matches_transformers(hf, name):
    """config.json's output_router_logits on: train.py's loss is CE + router_aux_loss_coef * aux_loss per token,
    transformers' labels= loss with output_router_logits=True."""
    import train
    work, ref = hf
    ids, mask = _batch()
    ours = load_pretrained(work / name)
    ours.cfg.output_router_logits = True
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": None, "train_mask": _trained(mask)}
    with torch.no_grad():
        loss = train.loss_sum(ours, batch, torch.device("cpu"))[0] / int(_trained(mask)[:, 1:].sum())
        dense = load_pretrained(work / name)
        ce = train.loss_sum(dense, batch, torch.device("cpu"))[0] / int(_trained(mask)[:, 1:].sum())
    assert loss > ce  # the aux loss is in
    assert abs(float(loss) - float(ref[name + "/loss"])) <= 1e-6 * float(loss)


@pytest.mark.parametrize("name", KV)
def test_kv_cache_generation_equals_full_forward(hf, name):
    assert kv_cache_error(load_pretrained(hf[0] / name)) <= 1e-5


@pytest.mark.parametrize("name", KV_HF)
def test_kv_cache_decoding_across_the_original_context_matches_transformers(hf, name):
    ids, _ = _batch()
    model = load_pretrained(hf[0] / name)
    steps = kv_cache_logits(model, ids, prefill=6)  # positions 6..11 cross the original context (8)
    assert (steps - hf[1][name + "/kv"]).abs().max() <= 1e-5
    with torch.no_grad():
        assert (steps - model(ids)).abs().max() > 1e-4  # (the rotation did change: not one full forward)
    if name == "phi3-longrope":  # every position past the original context: the long factors throughout
        assert kv_cache_error(model, T=12, prefill=9) <= 1e-5


def test_saved_models_load_in_transformers(hf, tmp_path):
    """Our save_pretrained output (MoE experts in the per-expert on-disk layout, Phi-3's fused projections,
    Gemma's tied head) gives transformers the same logits."""
    work, _ = hf
    ids, _ = _batch()
    want = {}
    for name in ("gemma", "gemma2", "gemma3_text", "phi3", "phi3-longrope", "mixtral", "qwen2_moe", "qwen3_moe"):
        model = load_pretrained(work / name)
        save_pretrained(model, tmp_path / name, max_shard_bytes=60_000)  # several shards
        with torch.no_grad():
            want[name] = model(ids)
    got = run_reference(f"""
        from transformers import AutoModelForCausalLM
        x = load_file("in.safetensors")
        res = {{}}
        for name in {list(want)!r}:
            m = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
            with torch.no_grad():
                res[name] = m(input_ids=x["ids"]).logits
        save_file(res, "out.safetensors")
    """, tmp_path, {"ids": ids})
    for name in want:
        assert (got[name] - want[name]).abs().max() <= 1e-5, name


def test_moe_checkpoint_keys_are_per_expert(hf):
    """The state dict is the on-disk layout transformers writes: Mixtral's block_sparse_moe.experts.<j>.w1,
    Qwen's mlp.experts.<j>.gate_proj, the router as <block>.gate.weight; Phi-3 keeps qkv_proj / gate_up_proj."""
    keys = set(load_pretrained(hf[0] / "mixtral").state_dict())
    assert {"model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.3.w2.weight"} <= keys
    keys = set(load_pretrained(hf[0] / "qwen2_moe").state_dict())
    assert {"model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.shared_expert_gate.weight",
            "model.layers.1.mlp.gate_proj.weight"} <= keys
    keys = set(load_pretrained(hf[0] / "phi3").state_dict())
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= keys


@pytest.mark.parametrize("name", MOES)
def test_grouped_expert_dispatch_equals_the_per_expert_loop(name):
    """The grouped_mm path (plain experts) gives the per-expert loop's output and gradients bit for bit, an unused
    expert included (its gradients zero); a LoRA-wrapped expert block takes the loop."""
    import peft
    torch.manual_seed(0)
    block = nt.model.SparseMoE(nt.ModelConfig.from_hf(CONFIGS[name]), torch.nn.functional.silu)
    with torch.no_grad():
        block.gate.weight[3] = -100.0  # expert 3 is never chosen (positive inputs)
    x = torch.rand(3, 20, block.gate.weight.shape[1])
    looped = nt.model.SparseMoE(nt.ModelConfig.from_hf(CONFIGS[name]), torch.nn.functional.silu)
    looped.load_state_dict(block.state_dict())
    first = next(iter(looped.experts[0].named_children()))[0]
    setattr(looped.experts[0], first, torch.nn.Sequential(getattr(looped.experts[0], first)))  # wrapped: the loop
    assert block.grouped and not looped.grouped
    grads = []
    for b in (block, looped):
        xi = x.clone().requires_grad_()
        y = b(xi)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append([y, xi.grad] + [p.grad for p in b.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert all(p.grad.abs().max() == 0 for p in block.experts[3].parameters())
    down = "w2" if name == "mixtral" else "down_proj"
    lora = peft.apply(nt.Transformer(nt.ModelConfig.from_hf(CONFIGS[name])), peft.LoraConfig(r=2, targets=[down]))
    assert not any(m.grouped for m in lora.modules() if isinstance(m, nt.model.SparseMoE))


@pytest.mark.parametrize("bad,msg", [
    ({"model_type": "mixtral", "router_jitter_noise": 0.1}, "router_jitter_noise=0.1 is not supported"),
    ({"model_type": "qwen3_moe", "num_experts_per_tok": 9}, "num_experts_per_tok=9 exceeds num_experts=4"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional_attention=true"),
    ({"model_type": "gemma2", "layer_types": ["full_attention"]}, "layer_types must list 2"),
    ({"model_type": "phi3", "partial_rotary_factor": 0.5, "rope_scaling": {**LONGROPE, "long_factor": [1.0]}}, "long_factor has 1 entries"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}}, "rope_scaling of type yarn needs factor"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "ntk"}}, "rope_scaling type 'ntk' is not supported"),
])
def test_unsupported_configs_are_one_line_errors(bad, msg):
    base = next(c for c in CONFIGS.values() if c["model_type"] == bad["model_type"]) \
        if bad["model_type"] != "llama" else tiny_hf_config("llama")
    with pytest.raises(ValueError, match=msg) as e:
        nt.ModelConfig.from_hf({**base, **bad}, "x/config.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("x/config.json: ")


@pytest.mark.slow
def test_gemma2_full_finetune_curve_matches_transformers(hf, tmp_path):
    """10 AdamW steps of full fine-tuning through train.py's loss (soft-capped head and attention, sliding
    layers, padding): the loss curve equals transformers' (labels= loss, same optimizer) to 1e-4 relative."""
    import train
    work, _ = hf
    ids, mask = _batch()
    trained = _trained(mask)
    labels = ids.masked_fill(~trained, -100)
    model = load_pretrained(work / "gemma2").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": None, "train_mask": trained}
    n = int(batch["train_mask"][:, 1:].sum())
    ours = []
    for _ in range(10):
        loss = train.loss_sum(model, batch, torch.device("cpu"))[0] / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        ours.append(loss.item())
    ref = run_reference(f"""
        from transformers import AutoModelForCausalLM
        x = load_file("in.safetensors")
        m = AutoModelForCausalLM.from_pretrained({str(work / "gemma2")!r}, dtype=torch.float32).train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01)
        losses = []
        for _ in range(10):
            loss = m(input_ids=x["ids"], attention_mask=x["mask"], labels=x["labels"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        save_file({{"losses": torch.tensor(losses, dtype=torch.float64)}}, "out.safetensors")
    """, tmp_path, {"ids": ids, "mask": mask, "labels": labels})["losses"]
    assert ref[-1] < ref[0] * 0.9  # it learns
    print(f"gemma2 curve: max relative difference {max(abs(a - b) / b for a, b in zip(ours, ref.tolist())):.1e}")
    for a, b in zip(ours, ref.tolist()):
        assert abs(a - b) <= 1e-4 * abs(b), (ours, ref.tolist())
