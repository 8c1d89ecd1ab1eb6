"""Shared machinery of the HF PEFT parity tests (LoRA/DoRA, IA3, BitFit): our side in-process, every
reference check for a test module in ONE subprocess.

For each architecture and case: our model gets the config, its adapter weights are randomised, the adapter is
saved; merged checkpoints are written (where the method merges); then the subprocess loads our adapters with
`PeftModel.from_pretrained`, our merged checkpoints with transformers, and writes PEFT's own randomised adapters
(with PEFT's trainable-parameter count) for our `load_adapter` to read back."""
import copy
import json

import torch

import model as nt
import peft
from tests.reference import make_hf_model, run_reference, tiny_hf_config

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 17], [3, 44, 8, 12, 120, 7, 6, 90]])
SCALES = ("magnitude_vector", "ia3_l")  # parameters that multiply: randomise around their init, not around 0


def lm_loss(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def randomize(m, seed):
    """Non-trivial adapter weights (LoRA's B is zero at init, which would hide most bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.core.adapter_parameters(m).items():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(p * (1 + 0.1 * noise) if n.endswith(SCALES) else p + 0.1 * noise)


def build(tmp, archs, cases, peft_cases=None, merge=True, pairs=None):
    """cases: name -> our config (a fresh one per call: apply may fill defaults in).
    peft_cases: name -> (PEFT config class name, kwargs), or None when PEFT has no such method.
    pairs: the (arch, case) pairs to run (default: every case on every arch)."""
    pairs = pairs or [(a, c) for a in archs for c in cases]
    out = {"hf": {}, "ours": {}, "base": {}, "tmp": tmp}
    for arch in archs:
        hf = make_hf_model(tmp / arch, tiny_hf_config(arch))
        out["hf"][arch] = hf
        base = nt.load_pretrained(hf)
        with torch.no_grad():
            out["base"][arch] = base(IDS)
        for case, make_cfg in cases.items():
            if (arch, case) not in pairs:
                continue
            m = peft.apply(copy.deepcopy(base), make_cfg())
            r = {"trainable": sum(p.numel() for p in m.parameters() if p.requires_grad), "model": m}
            with torch.no_grad():
                r["init"] = m(IDS)
                randomize(m, seed=len(case))
            logits = m(IDS)
            lm_loss(logits, IDS).backward()
            r["grads"] = {peft.core.PEFT_PREFIX + k: p.grad.clone() for k, p in peft.core.adapter_parameters(m).items()}
            m.zero_grad(set_to_none=True)
            r["logits"] = y = logits.detach()
            with torch.no_grad():
                peft.save_adapter(m, tmp / "ours" / arch / case, base_model_path=hf)
                if merge:
                    w0 = {k: v.clone() for k, v in m.state_dict().items() if k.endswith(("weight", "bias"))}
                    peft.merge(m)
                    r["merge_err"] = (m(IDS) - y).abs().max().item()
                    peft.unmerge(m)
                    sd = m.state_dict()
                    r["unmerge_err"] = max((sd[k] - w).abs().max().item() for k, w in w0.items() if k in sd)
                    r["unmerged_logits_err"] = (m(IDS) - y).abs().max().item()
                    nt.save_pretrained(peft.merge_and_unload(copy.deepcopy(m)), tmp / "merged" / arch / case)
            out["ours"][(arch, case)] = r
    out["ref"] = run_reference(f"""
        import copy, warnings
        import peft
        from transformers import AutoModelForCausalLM
        from peft import PeftModel, get_peft_model, get_peft_model_state_dict
        ids = load_file("in.safetensors")["ids"]
        cases = json.loads({json.dumps(json.dumps(peft_cases or {}))})
        out = {{}}
        for arch in {list(archs)!r}:
            base = AutoModelForCausalLM.from_pretrained("{tmp}/" + arch + "/hf", dtype=torch.float32).eval()
            for case in {list(cases)!r}:
                if [arch, case] not in {[list(p) for p in pairs]!r}:
                    continue
                key = arch + "." + case
                if {merge!r}:
                    merged = AutoModelForCausalLM.from_pretrained("{tmp}/merged/" + arch + "/" + case,
                                                                  dtype=torch.float32).eval()
                    with torch.no_grad():
                        out[key + ".merged_hf"] = merged(ids).logits
                if case not in cases:
                    continue
                d = "{tmp}/ours/" + arch + "/" + case
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    pm = PeftModel.from_pretrained(copy.deepcopy(base), d, is_trainable=True).eval()
                saved = set(load_file(d + "/adapter_model.safetensors"))
                expected = set(get_peft_model_state_dict(pm))
                warned = any("missing" in str(x.message).lower() for x in w)
                out[key + ".missing"] = torch.tensor(len(expected - saved) + len(saved - expected) + warned)
                logits = pm(ids).logits
                out[key + ".ours_in_peft"] = logits.detach()
                torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                  ids[:, 1:].reshape(-1)).backward()
                for n, p in pm.named_parameters():  # PEFT's names -> file keys (drop the adapter name)
                    if p.grad is not None:
                        n = n.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
                        out[key + ".grad." + n] = p.grad
                cls, kw = cases[case]
                torch.manual_seed(len(case) + 100)
                pm = get_peft_model(copy.deepcopy(base), getattr(peft, cls)(**kw))
                out[key + ".peft_trainable"] = torch.tensor(pm.get_nb_trainable_parameters()[0])
                with torch.no_grad():
                    for n, p in pm.named_parameters():
                        if p.requires_grad:
                            scale = any(s in n for s in {list(SCALES)!r})
                            p.copy_(p * (1 + 0.1 * torch.randn_like(p)) if scale else p + 0.1 * torch.randn_like(p))
                pm.eval().save_pretrained("{tmp}/peft/" + arch + "/" + case)
                with torch.no_grad():
                    out[key + ".peft_logits"] = pm(ids).logits
        save_file({{k: v.contiguous() for k, v in out.items()}}, "out.safetensors")
    """, tmp / "ref", {"ids": IDS})
    return out


# The proofs, shared by the test modules (each calls them from its own parametrised tests)

def check_identity_at_init(ref, arch, case):
    assert torch.equal(ref["ours"][(arch, case)]["init"], ref["base"][arch])


def check_export_loads_in_hf_peft(ref, arch, case):
    assert ref["ref"][f"{arch}.{case}.missing"].item() == 0
    ours = ref["ours"][(arch, case)]["logits"]
    assert not torch.allclose(ours, ref["base"][arch], atol=1e-3)  # the adapter does something
    assert (ref["ref"][f"{arch}.{case}.ours_in_peft"] - ours).abs().max().item() <= 1e-5


def check_hf_peft_adapter_loads_in_ours(ref, arch, case, cfg_type):
    m = peft.load_adapter(nt.load_pretrained(ref["hf"][arch]), ref["tmp"] / "peft" / arch / case)
    assert isinstance(m.peft_config, cfg_type)
    with torch.no_grad():
        assert (m(IDS) - ref["ref"][f"{arch}.{case}.peft_logits"]).abs().max().item() <= 1e-5
    return m


def check_grads_match_peft(ref, arch, case):
    """The same loss through PEFT's model gives the same adapter gradients (e.g. DoRA's detached norm)."""
    ours = ref["ours"][(arch, case)]["grads"]
    prefix = f"{arch}.{case}.grad."
    theirs = {k[len(prefix):]: v for k, v in ref["ref"].items() if k.startswith(prefix)}
    assert set(theirs) == set(ours)
    for k, g in ours.items():
        assert g.abs().max() > 0, k
        assert (theirs[k] - g).abs().max().item() <= 1e-5, k


def check_trainable_count(ref, arch, case):
    assert ref["ours"][(arch, case)]["trainable"] == ref["ref"][f"{arch}.{case}.peft_trainable"].item()


def check_merge(ref, arch, case):
    r = ref["ours"][(arch, case)]
    assert r["merge_err"] <= 1e-5
    assert r["unmerge_err"] <= 1e-6 and r["unmerged_logits_err"] <= 1e-5
    assert (ref["ref"][f"{arch}.{case}.merged_hf"] - r["logits"]).abs().max().item() <= 1e-5


def check_grads_and_adamw_step(m):
    """Gradients reach only the adapter; one AdamW step changes exactly the adapter parameters."""
    m.train()
    adapter = peft.core.adapter_parameters(m)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    logits = m(IDS)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1)).backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == (n in adapter), n
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    opt.step()
    for n, p in m.named_parameters():
        assert (not torch.equal(p, before[n])) == (n in adapter), n
    return adapter
