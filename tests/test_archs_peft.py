"""Every PEFT method and QLoRA on each architecture beyond LLaMA/Qwen (Gemma 1/2/3, Phi-3, Mixtral, Qwen2-MoE,
Qwen3-MoE), tiny random checkpoints written by our save_pretrained:
  - the methods HF PEFT has (LoRA, DoRA, IA3, prefix, prompt and P-tuning): our randomised adapters load in PEFT
    0.21 over transformers' model with equal logits (padding included); on the MoE models with output_router_logits,
    PEFT's labels= loss (CE + the router aux loss) equals train.py's for LoRA, DoRA, IA3, prompt and P-tuning
    (prefix tuning: transformers' aux loss fails on PEFT's prefix-extended mask);
  - what PEFT 0.21 + transformers 5 do with adapters on the fused experts (DROPPED below): LoRA on Qwen2-MoE's
    routed experts and IA3 on Mixtral's w2 experts are dropped silently on load (logits = ours without them);
    with PEFT's conversion table fixed for qwen2_moe, our routed-expert LoRA gives PEFT's logits;
  - the methods PEFT lacks (BitFit, bottleneck adapters, MAM, UniPELT, LLaMA-Adapter, AdaLoRA): train a step with
    gradients on every adapter tensor, save and reload exactly;
  - QLoRA equals LoRA on the dequantized base;
  - the combinations that can't work are one-line errors."""
import copy
import re

import pytest
import torch

import model as nt
import peft
import train
from quant import qlora
from tests.reference import padded_batch, run_reference
from tests.test_model_archs import CONFIGS, _trained
from tests.tiny import make_model

ARCHS = ("gemma", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe", "qwen3_moe")
MOES = ("mixtral", "qwen2_moe", "qwen3_moe")
# every projection, by the checkpoint's (= PEFT's) names: experts' included
LINEARS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
           "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
           # PEFT 0.21 drops LoRA on Qwen2-MoE's routed experts (DROPPED): the shared expert and the dense layer's
           # MLP here
           "qwen2_moe": r".*\.(q_proj|k_proj|v_proj|o_proj)|.*(shared_expert|layers\.1\.mlp)\.(gate|up|down)_proj"}
ATTN = {"phi3": ["qkv_proj"]}
IA3 = {"phi3": (["qkv_proj", "down_proj"], ["down_proj"]),  # PEFT has no phi3 default
       # PEFT 0.21 drops IA3 on Mixtral's experts (w2, its default; DROPPED): attention here
       "mixtral": (["k_proj", "v_proj"], []),
       "qwen2_moe": (["q_proj", "v_proj"], []), "qwen3_moe": (["q_proj", "v_proj"], [])}  # nor for Qwen MoE


def peft_cases(arch):
    """name -> config factory, the methods HF PEFT loads."""
    lin = LINEARS.get(arch, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ia3 = IA3.get(arch, (None, None))
    return {"lora": lambda: peft.LoraConfig(r=4, alpha=8, targets=lin),
            "dora": lambda: peft.LoraConfig(r=4, alpha=8, targets=ATTN.get(arch, ["q_proj", "v_proj"]), dora=True),
            "ia3": lambda: peft.IA3Config(targets=ia3[0], feedforward=ia3[1]),
            "prefix": lambda: peft.PrefixConfig(num_virtual_tokens=3),
            "prompt": lambda: peft.PromptConfig(num_virtual_tokens=4),
            "ptuning": lambda: peft.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16)}


# PEFT 0.21 + transformers 5: the experts are 3-D parameters (`experts.gate_up_proj`, `experts.down_proj`), and PEFT
# converts per-expert adapters onto them for LoRA only and only for the model types in transformers'
# _MODEL_TO_CONVERSION_PATTERN (mixtral: PEFT adds it, qwen3_moe -> qwen2_moe; qwen2_moe itself is missing). So LoRA on
# Qwen2-MoE's routed experts and IA3 on Mixtral's w2 are dropped on load, silently (no warning). Ours is checked
# twice: PEFT as released == ours with those tensors neutral; PEFT with qwen2_moe added to the table == ours.
DROPPED = {("qwen2_moe", "lora_experts"):  # attention + routed experts (PEFT's table needs the unnumbered name too)
           (lambda: peft.LoraConfig(r=4, alpha=8, targets=r".*\.(q_proj|k_proj|v_proj|o_proj)|.*experts(\.\d+)?\."
                                                          r"(gate|up|down)_proj"), r"\.experts\..*lora_B", 0.0, 12),
           ("mixtral", "ia3_w2"): (lambda: peft.IA3Config(targets=["k_proj", "v_proj", "w2"], feedforward=["w2"]),
                                   r"\.w2\.ia3", 1.0, 8)}  # dropped tensors: Qwen2-MoE 4 experts x 3 (layer 1 dense)


def own_cases(arch):
    """name -> config factory, the methods PEFT lacks (those that apply to `arch`)."""
    c = {"bitfit": lambda: peft.BitFitConfig(targets=["o_proj"]),
         "mam": lambda: peft.MamConfig(num_virtual_tokens=3, adapter_size=8),
         "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, targets=ATTN.get(arch, ["q_proj", "v_proj"]),
                                               total_step=10)}
    if arch != "mixtral":  # no down_proj (experts' w2): below
        c["adapter"] = lambda: peft.AdapterConfig(reduction_factor=8)
        c["unipelt"] = lambda: peft.UniPeltConfig(num_virtual_tokens=3, r=4,
                                                  targets=ATTN.get(arch, ["q_proj", "v_proj"]))
    if arch not in ("phi3", "gemma2"):  # fused qkv / soft-capped attention: below
        c["llama_adapter"] = lambda: peft.LlamaAdapterConfig(adapter_len=3, adapter_layers=1)
    return c


def randomise(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def logits(m, ids, mask):
    with torch.no_grad():
        if isinstance(m.peft_config, (peft.PromptConfig, peft.PTuningConfig)):
            return m(ids, attention_mask=mask, return_virtual=True)[:, m.peft_config.num_virtual_tokens:]
        return m(ids, attention_mask=mask)


def train_loss(m, ids, mask):
    """train.py's per-token loss (CE + router_aux_loss_coef * aux_loss with output_router_logits)."""
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": None, "train_mask": _trained(mask)}
    with torch.no_grad():
        return float(train.loss_sum(m, batch, torch.device("cpu"))[0]) / int(_trained(mask)[:, 1:].sum())


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("archs_peft")
    ids, mask = padded_batch()
    ours = {}
    for arch in ARCHS:
        cfg = {**CONFIGS[arch], "output_router_logits": arch in MOES}
        make_model(tmp / arch, seed=3, **cfg)
        for i, (case, make) in enumerate(peft_cases(arch).items()):
            m = peft.apply(nt.load_pretrained(tmp / arch), make())
            randomise(m, seed=i)
            peft.save_adapter(m, tmp / "ours" / arch / case, base_model_path=str(tmp / arch))
            ours[arch, case] = {"logits": logits(m, ids, mask), "loss": train_loss(m, ids, mask)}
    for (arch, case), (make, dropped, neutral, count) in DROPPED.items():
        m = peft.apply(nt.load_pretrained(tmp / arch), make())
        randomise(m, seed=7)
        peft.save_adapter(m, tmp / "ours" / arch / case, base_model_path=str(tmp / arch))
        ours[arch, case] = {"logits": logits(m, ids, mask)}
        with torch.no_grad():
            names = [n for n, p in m.named_parameters() if p.requires_grad and re.search(dropped, n)]
            assert len(names) == count, names
            for n in names:
                m.get_parameter(n).fill_(neutral)
        ours[arch, case]["without"] = logits(m, ids, mask)
    out = run_reference(f"""
        import warnings
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        x = load_file("in.safetensors")
        labels = x["labels"]
        out = {{}}
        def load(arch, case, key=None):
            base = AutoModelForCausalLM.from_pretrained("{tmp}/" + arch, dtype=torch.float32).eval()
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                pm = PeftModel.from_pretrained(base, "{tmp}/ours/" + arch + "/" + case).eval()
            key = key or arch + "." + case
            out[key + ".warnings"] = torch.tensor(sum("missing" in str(m.message).lower() or "unexpected"
                                                      in str(m.message).lower() for m in w))
            with torch.no_grad():
                out[key] = pm(input_ids=x["ids"], attention_mask=x["mask"], output_router_logits=False).logits
                # the loss has aux_loss in. Prompt / P-tuning: PEFT predicts the first token from the last virtual
                # one; train.py, like every causal LM, doesn't: its label is -100 there (then equal)
                if arch in {list(MOES)!r} and case in ("lora", "dora", "ia3", "prompt", "ptuning"):
                    y = labels.index_fill(1, torch.tensor([0]), -100) if case in ("prompt", "ptuning") else labels
                    out[key + ".loss"] = pm(input_ids=x["ids"], attention_mask=x["mask"], labels=y).loss
        for arch, case in {[list(k) for k in ours]!r}:
            load(arch, case)
        import peft.utils.transformers_weight_conversion as twc  # PEFT's table with qwen2_moe (as it adds mixtral)
        twc._MODEL_TO_CONVERSION_PATTERN["qwen2_moe"] = "qwen2_moe"
        load("qwen2_moe", "lora_experts", "fixed")
        save_file({{k: v.contiguous() for k, v in out.items()}}, "out.safetensors")
    """, tmp / "ref", {"ids": ids, "mask": mask, "labels": ids.masked_fill(~_trained(mask), -100)})
    return tmp, ours, out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", list(peft_cases("llama")))
def test_our_adapters_load_in_hf_peft(ref, arch, case):
    tmp, ours, theirs = ref
    _, mask = padded_batch()
    keep = mask.bool()  # padded positions are garbage in both
    key = f"{arch}.{case}"
    assert theirs[key + ".warnings"].item() == 0
    n = 4 if case == "prompt" else 3 if case == "ptuning" else 0  # PEFT's logits include the virtual tokens'
    err = (theirs[key][:, n:] - ours[arch, case]["logits"])[keep].abs().max().item()
    print(f"{arch} {case}: logits in PEFT max-abs {err:.1e}")
    assert err <= 1e-5
    # (HF's aux loss crashes on PEFT's prefix-extended mask: not compared)
    if arch in MOES and case != "prefix":
        assert abs(theirs[key + ".loss"].item() - ours[arch, case]["loss"]) <= 1e-5 * ours[arch, case]["loss"]


@pytest.mark.parametrize("arch,case", list(DROPPED))
def test_peft_drops_adapters_on_fused_experts(ref, arch, case):
    """PEFT 0.21 loads these adapters without a warning and without the expert tensors: its logits are ours with
    them neutral (LoRA B = 0, IA3 = 1), and far from ours with them."""
    tmp, ours, theirs = ref
    keep = padded_batch()[1].bool()
    key = f"{arch}.{case}"
    assert theirs[key + ".warnings"].item() == 0
    assert (theirs[key] - ours[arch, case]["without"])[keep].abs().max() <= 1e-5
    assert (theirs[key] - ours[arch, case]["logits"])[keep].abs().max() > 0.1
    if arch == "qwen2_moe":  # with qwen2_moe in PEFT's conversion table, the routed experts' LoRA is PEFT's
        assert theirs["fixed.warnings"].item() == 0
        assert (theirs["fixed"] - ours[arch, case]["logits"])[keep].abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_methods_without_peft_train_save_and_reload(ref, arch, tmp_path):
    tmp = ref[0]
    ids, mask = padded_batch()
    for i, (case, make) in enumerate(own_cases(arch).items()):
        # the methods' own init draws from the global generator: seed it, not the earlier tests' state (with some
        # states no token of the tiny batch routes to a Qwen3-MoE expert, and its adapter gets no gradient)
        torch.manual_seed(i)
        m = peft.apply(nt.load_pretrained(tmp / arch), make())
        randomise(m, seed=i)
        trained = {n: p for n, p in m.named_parameters() if p.requires_grad}
        assert trained, case
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": None, "train_mask": mask.bool()}
        train.loss_sum(m, batch, torch.device("cpu"))[0].backward()
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trained.values()), case
        peft.save_adapter(m, tmp_path / case, base_model_path=str(tmp / arch))
        again = peft.load_adapter(nt.load_pretrained(tmp / arch), tmp_path / case)
        assert torch.equal(logits(again, ids, mask), logits(m, ids, mask)), case


@pytest.mark.parametrize("arch", ARCHS)
def test_qlora_equals_lora_on_the_dequantized_base(ref, arch):
    tmp = ref[0]
    ids, mask = padded_batch()
    cfg = peft.LoraConfig(r=4, alpha=8, targets="all-linear")
    q = qlora.load_qlora(tmp / arch, copy.deepcopy(cfg))
    dense = nt.load_pretrained(tmp / arch)
    quantized = []
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, qlora.QLoraLinear):
                dense.get_submodule(name).weight.copy_(mod.dequantize(torch.float32))
                quantized.append(name)
    assert "model.layers.1.self_attn.o_proj" in quantized and "lm_head" not in quantized
    if arch in MOES:  # the experts are NF4 too
        assert any(".experts.3." in name for name in quantized)
    dense = peft.apply(dense, cfg)
    randomise(q, seed=1)
    theirs = peft.core.adapter_parameters(dense)
    with torch.no_grad():
        for k, p in peft.core.adapter_parameters(q).items():
            theirs[k].copy_(p)
    assert (logits(q, ids, mask) - logits(dense, ids, mask))[mask.bool()].abs().max() <= 1e-5


@pytest.mark.parametrize("arch,cfg,msg", [
    ("mixtral", peft.AdapterConfig(), "no linear module named 'down_proj'"),
    ("mixtral", peft.UniPeltConfig(), "no linear module named 'down_proj'"),
    ("phi3", peft.UniPeltConfig(), "no linear module named 'q_proj'"),
    ("phi3", peft.IA3Config(), "no linear module named 'k_proj'"),
    ("phi3", peft.LlamaAdapterConfig(adapter_layers=1), "not supported for model_type phi3"),
    ("gemma2", peft.LlamaAdapterConfig(adapter_layers=1), "not supported for model_type gemma2"),
])
def test_unsupported_combinations_are_one_line_errors(ref, arch, cfg, msg):
    with pytest.raises(ValueError, match=msg) as e:
        peft.apply(nt.load_pretrained(ref[0] / arch), cfg)
    assert "\n" not in str(e.value)
