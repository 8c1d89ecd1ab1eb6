"""LoRA on mixture-of-experts models against HF PEFT (transformers 5 + PEFT 0.21, in a subprocess): our adapters on
attention and on every expert projection load in PEFT with equal logits, and 10 AdamW steps of LoRA training give
PEFT's loss curve to 1e-4 relative.

transformers 5 keeps experts fused in memory (gate_up_proj (E, 2I, D), down_proj (E, D, I)); PEFT converts an
adapter in the per-expert layout (ours, `experts.<j>.w1.lora_A.weight`, the checkpoint's names) onto those tensors,
exactly at load time. It fuses w1/w3 LoRA into one rank-2r LoRA with a block-diagonal B, whose off-diagonal blocks
then train too: that is another method than separate LoRAs, so the training curve is compared with LoRA on the
attention and the experts' down projections (w2 / down_proj), which PEFT keeps per expert, rank r."""

import pytest
import torch

import peft
from model import load_pretrained
from tests import peft_cases as pc
from tests.reference import make_hf_model, run_reference, tiny_hf_config

MOE = dict(num_experts_per_tok=2, rms_norm_eps=1e-6)
ARCHS = {
    "mixtral": (tiny_hf_config("mixtral", num_local_experts=4, **MOE), ["w1", "w2", "w3"], ["w2"]),
    "qwen3_moe": (tiny_hf_config("qwen3_moe", num_experts=4, moe_intermediate_size=32, head_dim=16,
                                 norm_topk_prob=True, **MOE), ["gate_proj", "up_proj", "down_proj"], ["down_proj"]),
}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
STEPS, LR = 10, 1e-2
pytestmark = pytest.mark.slow  # HF PEFT's MoE conversion and two 10-step trainings: ~1 min on 2 cores


def _train(m, steps=STEPS):
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(steps):
        loss = pc.lm_loss(m(pc.IDS), pc.IDS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_lora")
    ours = {}
    for arch, (cfg, experts, down) in ARCHS.items():
        hf = make_hf_model(tmp / arch, cfg)
        for case, targets in (("all", ATTN + experts), ("curve", ["q_proj", "v_proj"] + down)):
            m = peft.apply(load_pretrained(hf), peft.LoraConfig(r=4, alpha=8, targets=targets))
            pc.randomize(m, seed=len(case))
            peft.save_adapter(m, tmp / "ours" / arch / case, base_model_path=hf)
            with torch.no_grad():
                logits = m(pc.IDS)
            ours[arch, case] = {"logits": logits, "model": m, "base": load_pretrained(hf)(pc.IDS).detach()}
            if case == "curve":
                ours[arch, case]["losses"] = _train(m.train())
    out = run_reference(f"""
        import copy
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        ids = load_file("in.safetensors")["ids"]
        out = {{}}
        def lm_loss(logits):
            return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1))
        for arch in {list(ARCHS)!r}:
            base = AutoModelForCausalLM.from_pretrained("{tmp}/" + arch + "/hf", dtype=torch.float32).eval()
            for case in ("all", "curve"):
                pm = PeftModel.from_pretrained(copy.deepcopy(base), "{tmp}/ours/" + arch + "/" + case,
                                               is_trainable=True)
                with torch.no_grad():
                    out[arch + "." + case + ".logits"] = pm.eval()(ids).logits
                if case == "curve":
                    pm.train()
                    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr={LR})
                    losses = []
                    for _ in range({STEPS}):
                        loss = lm_loss(pm(ids).logits)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        losses.append(loss.item())
                    out[arch + ".losses"] = torch.tensor(losses, dtype=torch.float64)
        save_file({{k: v.contiguous() for k, v in out.items()}}, "out.safetensors")
    """, tmp / "ref", {"ids": pc.IDS})
    return ours, out


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("case", ["all", "curve"])
def test_our_moe_adapters_load_in_hf_peft(ref, arch, case):
    ours, theirs = ref
    r = ours[arch, case]
    assert not torch.allclose(r["logits"], r["base"], atol=1e-3)  # the adapter does something
    assert (theirs[f"{arch}.{case}.logits"] - r["logits"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", list(ARCHS))
def test_moe_lora_curve_matches_hf_peft(ref, arch):
    ours, theirs = ref
    got, want = ours[arch, "curve"]["losses"], theirs[f"{arch}.losses"].tolist()
    assert want[-1] < want[0] * 0.9  # it learns
    print(f"{arch} LoRA curve: max relative difference {max(abs(a - b) / b for a, b in zip(got, want)):.1e}")
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-4 * abs(b), (got, want)


def test_expert_lora_targets_each_expert(ref):
    """`w1` reaches every expert of every MoE layer (4 experts x 2 layers), and LoRA's all-linear leaves the router
    (not an nn.Linear, as in transformers 5) alone."""
    m = ref[0]["mixtral", "all"]["model"]
    names = [n for n in peft.core.adapter_parameters(m) if n.endswith("w1.lora_A.weight")]
    assert len(names) == 8
    assert not any(".gate." in n for n in peft.core.find_targets(m, "all-linear"))
