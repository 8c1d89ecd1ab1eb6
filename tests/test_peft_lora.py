"""LoRA / rsLoRA / DoRA proven against HF PEFT on tiny random llama and qwen2 models.

All reference work (PEFT loading our exports, PEFT writing its own randomised adapters, transformers loading our
merged checkpoints) runs in ONE subprocess for the whole module; our side runs in-process."""
import copy
import json

import pytest
import torch

import model as nt
import peft
from tests.reference import make_hf_model, run_reference, tiny_hf_config

ARCHS = ("llama", "qwen2")
CASES = {  # name -> our config (PEFT gets the same hyper-parameters)
    "lora": dict(r=4, alpha=8, targets=["q_proj", "v_proj"]),
    "rslora_gauss_all": dict(r=8, alpha=16, targets="all-linear", rslora=True, init="gaussian"),
    "regex": dict(r=2, alpha=4, targets=r".*\.(k_proj|down_proj)"),
    "dora": dict(r=4, alpha=8, targets=["q_proj", "k_proj", "o_proj", "up_proj"], dora=True),
    "dora_rslora_all": dict(r=4, alpha=8, targets="all-linear", dora=True, rslora=True),
}
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 17], [3, 44, 8, 12, 120, 7, 6, 90]])


def randomize(m, seed):
    """Non-trivial adapter weights (B is zero at init, which would hide most bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.core.adapter_parameters(m).items():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(p * (1 + 0.1 * noise) if n.endswith("magnitude_vector") else 0.1 * noise)


def peft_kwargs(cfg: peft.LoraConfig) -> dict:
    d = cfg.to_json()
    return {k: d[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
                              "init_lora_weights", "task_type")}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peft_lora")
    out = {"hf": {}, "ours": {}, "base": {}}
    for arch in ARCHS:
        hf = make_hf_model(tmp / arch, tiny_hf_config(arch))
        out["hf"][arch] = hf
        base = nt.load_pretrained(hf)
        with torch.no_grad():
            out["base"][arch] = base(IDS)
        for case, kw in CASES.items():
            cfg = peft.LoraConfig(**kw)
            m = peft.apply(copy.deepcopy(base), cfg)
            r = {"trainable": sum(p.numel() for p in m.parameters() if p.requires_grad)}
            with torch.no_grad():
                r["init"] = m(IDS)
                randomize(m, seed=len(case))
                r["logits"] = y = m(IDS)
                peft.save_adapter(m, tmp / "ours" / arch / case, base_model_path=hf)
                w0 = {k: v.clone() for k, v in m.state_dict().items() if k.endswith("proj.weight")}
                peft.merge(m)
                r["merge_err"] = (m(IDS) - y).abs().max().item()
                peft.unmerge(m)
                r["unmerge_err"] = max((m.state_dict()[k] - w).abs().max().item() for k, w in w0.items())
                r["unmerged_logits_err"] = (m(IDS) - y).abs().max().item()
                merged = peft.merge_and_unload(m)
                nt.save_pretrained(merged, tmp / "merged" / arch / case)
            out["ours"][(arch, case)] = r
    cases = {c: peft_kwargs(peft.LoraConfig(**kw)) for c, kw in CASES.items()}
    res = run_reference(f"""
        import copy, warnings
        from transformers import AutoModelForCausalLM
        from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
        ids = load_file("in.safetensors")["ids"]
        cases = json.loads({json.dumps(json.dumps(cases))})
        out = {{}}
        for arch in {list(ARCHS)!r}:
            base = AutoModelForCausalLM.from_pretrained("{tmp}/" + arch + "/hf", dtype=torch.float32).eval()
            for case, kw in cases.items():
                key = arch + "." + case
                d = "{tmp}/ours/" + arch + "/" + case
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    pm = PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
                saved = set(load_file(d + "/adapter_model.safetensors"))
                expected = set(get_peft_model_state_dict(pm))
                warned = any("missing" in str(x.message).lower() for x in w)
                out[key + ".missing"] = torch.tensor(len(expected - saved) + len(saved - expected) + warned)
                with torch.no_grad():
                    out[key + ".ours_in_peft"] = pm(ids).logits
                    merged = AutoModelForCausalLM.from_pretrained("{tmp}/merged/" + arch + "/" + case,
                                                                  dtype=torch.float32).eval()
                    out[key + ".merged_hf"] = merged(ids).logits
                torch.manual_seed(len(case) + 100)
                pm = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
                out[key + ".peft_trainable"] = torch.tensor(pm.get_nb_trainable_parameters()[0])
                with torch.no_grad():
                    for n, p in pm.named_parameters():
                        if "lora_" in n:
                            p.copy_(p * (1 + 0.1 * torch.randn_like(p)) if "magnitude" in n else 0.1 * torch.randn_like(p))
                pm.eval().save_pretrained("{tmp}/peft/" + arch + "/" + case)
                with torch.no_grad():
                    out[key + ".peft_logits"] = pm(ids).logits
        save_file({{k: v.contiguous() for k, v in out.items()}}, "out.safetensors")
    """, tmp / "ref", {"ids": IDS})
    out["ref"], out["tmp"] = res, tmp
    return out


PARAMS = [(a, c) for a in ARCHS for c in CASES]


@pytest.mark.parametrize("arch,case", PARAMS)
def test_identity_at_init(ref, arch, case):
    assert torch.equal(ref["ours"][(arch, case)]["init"], ref["base"][arch])


@pytest.mark.parametrize("arch,case", PARAMS)
def test_export_loads_in_hf_peft(ref, arch, case):
    assert ref["ref"][f"{arch}.{case}.missing"].item() == 0
    ours = ref["ours"][(arch, case)]["logits"]
    assert not torch.allclose(ours, ref["base"][arch], atol=1e-3)  # the adapter does something
    assert (ref["ref"][f"{arch}.{case}.ours_in_peft"] - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch,case", PARAMS)
def test_hf_peft_adapter_loads_in_ours(ref, arch, case):
    m = peft.load_adapter(nt.load_pretrained(ref["hf"][arch]), ref["tmp"] / "peft" / arch / case)
    assert isinstance(m.peft_config, peft.LoraConfig) and m.peft_config.dora == CASES[case].get("dora", False)
    with torch.no_grad():
        assert (m(IDS) - ref["ref"][f"{arch}.{case}.peft_logits"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch,case", PARAMS)
def test_trainable_count_matches_peft(ref, arch, case):
    assert ref["ours"][(arch, case)]["trainable"] == ref["ref"][f"{arch}.{case}.peft_trainable"].item()


@pytest.mark.parametrize("arch,case", PARAMS)
def test_merge_unmerge_and_merged_checkpoint(ref, arch, case):
    r = ref["ours"][(arch, case)]
    assert r["merge_err"] <= 1e-5
    assert r["unmerge_err"] <= 1e-6 and r["unmerged_logits_err"] <= 1e-5
    assert (ref["ref"][f"{arch}.{case}.merged_hf"] - r["logits"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["lora", "dora"])
def test_grads_only_on_adapter_and_adamw_step(case):
    base = nt.Transformer(nt.ModelConfig.from_hf(tiny_hf_config("qwen2"))).init_weights(seed=0)
    m = peft.apply(base, peft.LoraConfig(**CASES[case]))
    m.train()
    adapter = peft.core.adapter_parameters(m)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    logits = m(IDS)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), IDS[:, 1:].reshape(-1)).backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == (n in adapter), n
    assert all(adapter[n].grad.abs().sum() > 0 for n in adapter if "lora_B" in n or "magnitude" in n)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    opt.step()
    for n, p in m.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in adapter), n
    assert "q_proj.weight" in " ".join(m.state_dict())  # base keys keep their names


def test_dropout_only_on_lora_branch():
    base = nt.Transformer(nt.ModelConfig.from_hf(tiny_hf_config("llama"))).init_weights(seed=0)
    with torch.no_grad():
        y0 = base(IDS)
    m = peft.apply(base, peft.LoraConfig(r=4, dropout=0.5, targets="all-linear"))
    m.train()
    with torch.no_grad():
        assert torch.equal(m(IDS), y0)  # B = 0: dropout on the branch input can't change the output
        randomize(m, 0)
        assert not torch.allclose(m(IDS), m(IDS))  # dropout is active in training
        m.eval()
        assert torch.equal(m(IDS), m(IDS))


def test_dora_norm_is_detached():
    """PEFT/the paper: ||W + sBA|| is a constant in backward, so grad(m) = (W'x/||.||) . grad(y) exactly."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    d = peft.lora.DoraLinear.from_module(lin, peft.LoraConfig(r=2, alpha=2, dora=True))
    randomize(torch.nn.ModuleDict({"d": d}), 1)
    x = torch.randn(3, 6)
    d(x).sum().backward()
    w = lin.weight + d.delta_weight()
    n = w.norm(dim=1).detach()
    expected = ((x @ w.T) / n).sum(0)  # dy/dm with n constant
    assert torch.allclose(d.lora_magnitude_vector.grad, expected.detach(), atol=1e-6)
