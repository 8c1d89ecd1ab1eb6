"""peft.disabled(model): inside it, every PEFT method computes exactly the base model (torch.equal), which is what
preference tuning's reference model is under PEFT (no second copy). Outside it, the adapter is back."""
import copy

import pytest
import torch

import model as M
import peft
from quant.qlora import load_nf4
from tests.tiny import make_model

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 17], [3, 44, 8, 12, 120, 7, 6, 90]])
MASK = torch.tensor([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("disabled") / "base", seed=4)


def randomize(m, seed):
    """Every trained tensor moved off its init (LoRA's B and LLaMA-Adapter's gate start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def check(base, m):
    """Base logits == disabled logits (bit for bit), the adapter changes them, and comes back after."""
    with torch.no_grad():
        want = base(IDS, attention_mask=MASK)
        adapted = m(IDS, attention_mask=MASK)
        with peft.disabled(m):
            off = m(IDS, attention_mask=MASK)
        again = m(IDS, attention_mask=MASK)
    assert torch.equal(off, want)
    assert not torch.allclose(adapted, want, atol=1e-4)  # a real adapter, so disabling is not trivially true
    assert torch.equal(again, adapted)


@pytest.mark.parametrize("method", sorted(peft.method_configs()))
def test_every_method_disabled_is_the_base(base_dir, method):
    base = M.load_pretrained(base_dir)
    cls, preset = peft.method_configs()[method]
    kw = dict(preset)
    if cls is peft.BitFitConfig:
        kw["targets"] = "all-linear"  # the tiny llama has no biases: BitFit adds them
    if cls is peft.LlamaAdapterConfig:
        kw["adapter_layers"] = 2      # the tiny model's layers (default 8)
    if "base_model_name_or_path" in cls.__dataclass_fields__:
        kw["base_model_name_or_path"] = str(base_dir)
    m = peft.apply(copy.deepcopy(base), cls(**kw))
    randomize(m, seed=1)
    check(base, m)


def test_qlora_disabled_is_the_nf4_base(base_dir):
    base = load_nf4(base_dir, quantize=True)
    m = peft.apply(load_nf4(base_dir, quantize=True), peft.LoraConfig(r=4, targets="all-linear"))
    randomize(m, seed=2)
    check(base, m)


def test_disabled_gradients_reach_nothing_and_adapter_trains_after(base_dir):
    """A reference pass inside the block builds no graph into the adapter; training outside still does."""
    m = peft.apply(M.load_pretrained(base_dir), peft.LoraConfig(r=4, targets="all-linear"))
    randomize(m, seed=3)
    with peft.disabled(m):
        out = m(IDS)
    assert not out.requires_grad  # only frozen base weights took part
    m(IDS).sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_merged_adapter_cannot_be_disabled(base_dir):
    m = peft.merge(peft.apply(M.load_pretrained(base_dir), peft.LoraConfig(r=4, targets="all-linear")))
    with pytest.raises(ValueError, match="merged into the base weights: unmerge it"):
        with peft.disabled(m):
            pass


def test_disabled_restores_after_an_exception(base_dir):
    m = peft.apply(M.load_pretrained(base_dir), peft.LoraConfig(r=4, targets="all-linear"))
    randomize(m, seed=5)
    with torch.no_grad():
        before = m(IDS)
        with pytest.raises(RuntimeError, match="boom"):
            with peft.disabled(m):
                raise RuntimeError("boom")
        assert torch.equal(m(IDS), before)
