"""(IA)^3 proven against HF PEFT on tiny random llama and qwen2 models (PEFT's default targets per
architecture and explicit ones; reference work in one subprocess: see tests/peft_cases.py)."""
import pytest
import torch

import model as nt
import peft
from tests import peft_cases as pc
from tests.reference import tiny_hf_config

ARCHS = ("llama", "qwen2")
CASES = {  # name -> (our config kwargs, PEFT IA3Config kwargs)
    "default": ({}, {}),
    "explicit": (dict(targets=["q_proj", "o_proj", "up_proj", "down_proj"], feedforward=["up_proj", "down_proj"]),
                 dict(target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                      feedforward_modules=["up_proj", "down_proj"])),
}
PARAMS = [(a, c) for a in ARCHS for c in CASES]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return pc.build(tmp_path_factory.mktemp("peft_ia3"), ARCHS,
                    {c: (lambda kw=kw: peft.IA3Config(**kw)) for c, (kw, _) in CASES.items()},
                    {c: ("IA3Config", {"task_type": "CAUSAL_LM", **pk}) for c, (_, pk) in CASES.items()})


@pytest.mark.parametrize("arch,case", PARAMS)
def test_identity_at_init(ref, arch, case):
    pc.check_identity_at_init(ref, arch, case)


@pytest.mark.parametrize("arch,case", PARAMS)
def test_export_loads_in_hf_peft(ref, arch, case):
    pc.check_export_loads_in_hf_peft(ref, arch, case)


@pytest.mark.parametrize("arch,case", PARAMS)
def test_hf_peft_adapter_loads_in_ours(ref, arch, case):
    pc.check_hf_peft_adapter_loads_in_ours(ref, arch, case, peft.IA3Config)


@pytest.mark.parametrize("arch,case", PARAMS)
def test_adapter_grads_match_peft(ref, arch, case):
    pc.check_grads_match_peft(ref, arch, case)


@pytest.mark.parametrize("arch,case", PARAMS)
def test_trainable_count_matches_peft(ref, arch, case):
    pc.check_trainable_count(ref, arch, case)


@pytest.mark.parametrize("arch,case", PARAMS)
def test_merge_unmerge_and_merged_checkpoint(ref, arch, case):
    pc.check_merge(ref, arch, case)


def test_default_targets_follow_peft(ref):
    assert ref["ours"][("llama", "default")]["model"].peft_config.targets == ["k_proj", "v_proj", "down_proj"]
    assert ref["ours"][("qwen2", "default")]["model"].peft_config.targets == ["q_proj", "v_proj", "down_proj"]


def test_grads_only_on_adapter_and_adamw_step():
    base = nt.Transformer(nt.ModelConfig.from_hf(tiny_hf_config("llama"))).init_weights(seed=0)
    adapter = pc.check_grads_and_adamw_step(peft.apply(base, peft.IA3Config()))
    assert all(p.grad.abs().sum() > 0 for p in adapter.values())
