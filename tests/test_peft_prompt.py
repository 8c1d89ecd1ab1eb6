"""Prompt tuning, P-tuning, prefix tuning and LLaMA-Adapter against HF PEFT 0.21.2 (tiny random llama/qwen2/qwen3).

One reference subprocess for the whole module: it loads our exported adapters with `PeftModel.from_pretrained`,
and writes PEFT's own (randomised) adapters for us to load, with PEFT's logits for both.
"""
import json
import os

import pytest
import torch

from model import KVCache, ModelConfig, Transformer, load_pretrained, save_pretrained
import peft
from peft import llama_adapter, prefix, prompt
from peft.llama_adapter import LlamaAdapterConfig
from peft.prefix import PrefixConfig
from peft.prompt import PromptConfig, PTuningConfig
from tests.reference import run_reference, tiny_hf_config

# name -> (base model type, method module, config factory)
CASES = {
    "prompt_llama": ("llama", prompt, lambda: PromptConfig(num_virtual_tokens=4)),
    "prompt_qwen2": ("qwen2", prompt, lambda: PromptConfig(num_virtual_tokens=3, init="sample_vocab")),
    "ptune_mlp": ("llama", prompt, lambda: PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=32)),
    "ptune_lstm": ("qwen2", prompt, lambda: PTuningConfig(num_virtual_tokens=3, encoder="lstm",
                                                          encoder_hidden_size=16)),
    "prefix_llama": ("llama", prefix, lambda: PrefixConfig(num_virtual_tokens=4)),
    "prefix_qwen2": ("qwen2", prefix, lambda: PrefixConfig(num_virtual_tokens=3)),
    "prefix_qwen3": ("qwen3", prefix, lambda: PrefixConfig(num_virtual_tokens=2)),  # head_dim != hidden/heads
    "prefix_proj": ("llama", prefix, lambda: PrefixConfig(num_virtual_tokens=4, prefix_projection=True,
                                                          encoder_hidden_size=32)),
    "adapter_llama": ("llama", llama_adapter, lambda: LlamaAdapterConfig(adapter_len=5, adapter_layers=1)),
}
PROMPT_METHODS = ("prompt", "ptune")


def randomise(model, seed):
    """Non-trivial adapter weights (the LLaMA-Adapter gate too, else its branch is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.numel() > 1 else 1.0))


def tiny_base(mt, seed=0):
    cfg = ModelConfig.from_hf(tiny_hf_config(mt))
    m = Transformer(cfg).init_weights(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random norms and biases so that they are tested
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or n.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def ours_logits(model, ids, mask, name):
    with torch.no_grad():
        if name.startswith(PROMPT_METHODS):
            return model(ids, attention_mask=mask, return_virtual=True)
        return model(ids, attention_mask=mask)


REFERENCE = """
import warnings
from transformers import AutoModelForCausalLM
from peft import PeftConfig, PeftModel, get_peft_model
x = load_file("in.safetensors")
cases = json.load(open("cases.json"))
out = {}
def base(mt):
    return AutoModelForCausalLM.from_pretrained(mt, dtype=torch.float32).eval()
for name, mt in cases.items():
    # 1. our export, loaded by PEFT
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base(mt), "ours/" + name).eval()
    out[name + ".missing"] = torch.tensor(sum("missing" in str(m.message).lower() for m in w))
    with torch.no_grad():
        out[name + ".export"] = pm(input_ids=x["ids"], attention_mask=x["mask"]).logits
        out[name + ".loss"] = pm(input_ids=x["ids"], attention_mask=x["mask"], labels=x["labels"]).loss
    # 2. PEFT's own adapter, same hyper-parameters, randomised, saved for us to load
    cfg = PeftConfig.from_pretrained("ours/" + name)
    cfg.inference_mode = False
    torch.manual_seed(1)
    pm = get_peft_model(base(mt), cfg)
    out[name + ".count"] = torch.tensor(pm.get_nb_trainable_parameters()[0])
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * (0.5 if p.numel() > 1 else 1.0))
    pm.eval()
    if name.startswith("ptune"):  # the encoder and its output, to check our PromptEncoder with PEFT's weights
        for k, v in pm.prompt_encoder["default"].state_dict().items():
            out[name + ".enc." + k] = v
        out[name + ".enc_out"] = pm.get_prompt_embedding_to_save("default")
    pm.save_pretrained("peft/" + name)
    with torch.no_grad():
        out[name + ".peft"] = pm(input_ids=x["ids"], attention_mask=x["mask"]).logits
# TEXT init with a tokenizer
from peft import PromptTuningConfig
pm = get_peft_model(base("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7,
     prompt_tuning_init="TEXT", prompt_tuning_init_text="b a c", tokenizer_name_or_path="tok"))
out["text_init"] = pm.prompt_encoder["default"].embedding.weight.detach()
save_file({k: v.contiguous() for k, v in out.items()}, "out.safetensors")
"""


def make_tokenizer(path):
    """A tiny word-level tokenizer (ids 3.. for a few words, BOS prepended) that both stacks load."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "a": 5, "b": 6, "c": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "<pad>"}, f)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("peft_prompt")
    for mt in ("llama", "qwen2", "qwen3"):
        save_pretrained(tiny_base(mt), d / mt)
    make_tokenizer(d / "tok")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0                                    # left padding
    ids[1, :3] = 0
    ours = {}
    for i, (name, (mt, mod, make)) in enumerate(CASES.items()):
        model = mod.apply(load_pretrained(d / mt), make())
        randomise(model, seed=10 + i)
        peft.save_adapter(model, d / "ours" / name, base_model_path=str(d / mt))
        ours[name] = ours_logits(model, ids, mask, name)
    with open(d / "cases.json", "w") as f:
        json.dump({name: mt for name, (mt, _, _) in CASES.items()}, f)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :2] = -100                               # a masked "prompt" part, like SFT
    out = run_reference(REFERENCE, d, {"ids": ids, "mask": mask, "labels": labels})
    return {"dir": d, "ids": ids, "mask": mask, "labels": labels, "ours": ours, "out": out}


def real(logits, mask, n=0):
    """Logits at real (non-pad) token positions, after n virtual positions."""
    return logits[:, n:][mask.bool()]


def n_virtual(name):
    return CASES[name][2]().num_virtual_tokens if name.startswith(PROMPT_METHODS) else 0


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_hf_peft(ref, name):
    out, n = ref["out"], n_virtual(name)
    assert out[name + ".missing"].item() == 0
    ours, theirs = ref["ours"][name], out[name + ".export"]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(real(ours, ref["mask"], n), real(theirs, ref["mask"], n), atol=1e-5, rtol=0)
    if n:  # the virtual positions match too (PEFT returns them)
        torch.testing.assert_close(ours[:, :n], theirs[:, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_peft_written_adapter_loads(ref, name):
    mt, mod, make = CASES[name]
    model = peft.load_adapter(load_pretrained(ref["dir"] / mt), ref["dir"] / "peft" / name)
    n = n_virtual(name)
    ours, theirs = ours_logits(model, ref["ids"], ref["mask"], name), ref["out"][name + ".peft"]
    torch.testing.assert_close(real(ours, ref["mask"], n), real(theirs, ref["mask"], n), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_trainable_count_matches_peft(ref, name):
    mt, mod, make = CASES[name]
    model = mod.apply(tiny_base(mt), make())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref["out"][name + ".count"].item()


@pytest.mark.parametrize("name", ["ptune_mlp", "ptune_lstm"])
def test_prompt_encoder_equals_peft(ref, name):
    """Our PromptEncoder with PEFT's encoder weights gives PEFT's exported prompt_embeddings."""
    mt, _, make = CASES[name]
    model = prompt.apply(tiny_base(mt), make())
    pre = name + ".enc."
    model.encoder.load_state_dict({k[len(pre):]: v for k, v in ref["out"].items() if k.startswith(pre)})
    torch.testing.assert_close(prompt.export_state(model)["prompt_embeddings"], ref["out"][name + ".enc_out"],
                               atol=1e-5, rtol=0)


def test_text_init_equals_peft(ref):
    base = load_pretrained(ref["dir"] / "llama")
    cfg = PromptConfig(num_virtual_tokens=7, init="text", init_text="b a c",
                       tokenizer_name_or_path=str(ref["dir"] / "tok"))
    model = prompt.apply(base, cfg)
    torch.testing.assert_close(model.encoder(), ref["out"]["text_init"], atol=0, rtol=0)


def test_sample_vocab_init_takes_vocab_rows():
    base = tiny_base("llama")
    model = prompt.apply(base, PromptConfig(num_virtual_tokens=5, init="sample_vocab"))
    emb = base.model.embed_tokens.weight
    for row in model.encoder():
        assert (emb == row).all(-1).any()


@pytest.mark.parametrize("name", [c for c in CASES if not c.startswith("adapter")])
def test_loss_with_labels_matches_peft(ref, name):
    """PEFT's loss: for prompt methods labels get n -100s in front (pad_labels) and the logits include the virtual
    positions, so the last virtual token predicts the first real label. (LLaMA-Adapter has no label handling; its
    loss here would include a prediction from a fully masked left-pad row, whose value is arbitrary.)"""
    logits, labels = ref["ours"][name], ref["labels"]
    if name.startswith(PROMPT_METHODS):
        labels = prompt.pad_labels(labels, n_virtual(name))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(loss, ref["out"][name + ".loss"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mt", ["llama", "qwen2"])
def test_llama_adapter_is_identity_at_init(mt):
    base = tiny_base(mt)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        before = base(ids)
        after = llama_adapter.apply(base, LlamaAdapterConfig(adapter_len=4, adapter_layers=2))(ids)
    assert torch.equal(before, after)
    assert {k for k in base.state_dict() if "adaption" not in k} == set(tiny_base(mt).state_dict())


ALL = list(CASES) + [("adapter_qwen2", "qwen2", llama_adapter, lambda: LlamaAdapterConfig(adapter_len=3,
                                                                                         adapter_layers=2))]


def case(c):
    return (c, *CASES[c]) if isinstance(c, str) else c


@pytest.mark.parametrize("c", ALL, ids=lambda c: case(c)[0])
def test_grads_reach_only_method_params(c):
    name, mt, mod, make = case(c)
    base = tiny_base(mt)
    base_params = dict(base.named_parameters())
    model = mod.apply(base, make())
    randomise(model, seed=0)  # the LLaMA-Adapter gate must be non-zero for its prompt to get a gradient
    ids = torch.randint(3, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(id(p) not in map(id, base_params.values()) or "adaption" in n
                             for n, p in trainable.items())
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model(ids, attention_mask=mask).logsumexp(-1).mean().backward()
    assert all(p.grad is None for n, p in base_params.items() if "adaption" not in n)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in trainable.items())


@pytest.mark.parametrize("c", ALL, ids=lambda c: case(c)[0])
def test_kv_cache_generation_equals_full_forward(c):
    """Left-padded batch: prefill 5 tokens, then one token at a time, against one full forward."""
    name, mt, mod, make = case(c)
    model = mod.apply(tiny_base(mt), make())
    randomise(model, seed=1)
    ids = torch.randint(3, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = KVCache(model.cfg.num_hidden_layers)
        steps = [model(ids[:, :5], attention_mask=mask[:, :5], cache=cache)]
        for t in range(5, 9):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    torch.testing.assert_close(real(torch.cat(steps, 1), mask), real(full, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["prompt_llama", "ptune_lstm", "prefix_qwen2"])
def test_4d_mask_and_position_ids_equal_padding_mask(name):
    """A ready (B, 1, T, S) mask and explicit position_ids (packing's inputs) give the same as the defaults."""
    mt, mod, make = CASES[name]
    model = mod.apply(tiny_base(mt), make())
    ids = torch.randint(3, 128, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    mask4 = causal[None, None] & mask.bool()[:, None, None, :]
    pos = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        a = model(ids, attention_mask=mask)
        b = model(ids, attention_mask=mask4, position_ids=pos)
    torch.testing.assert_close(real(a, mask), real(b, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["ptune_lstm", "prefix_proj"])
def test_encoder_file_resumes_training(tmp_path, name):
    """PEFT saves only the encoder output; our extra prompt_encoder.safetensors brings the encoder back."""
    mt, mod, make = CASES[name]
    model = mod.apply(tiny_base(mt), make())
    randomise(model, seed=2)
    peft.save_adapter(model, tmp_path)
    assert (tmp_path / prompt.ENCODER_FILE).exists()
    loaded = peft.load_adapter(tiny_base(mt), tmp_path)
    assert type(loaded.encoder) is type(model.encoder)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(loaded.encoder(), model.encoder(), atol=0, rtol=0)
    # without the extra file: PEFT's view, the output as a plain trainable table
    os.remove(tmp_path / prompt.ENCODER_FILE)
    table = peft.load_adapter(tiny_base(mt), tmp_path)
    assert isinstance(table.encoder, prompt.Table)  # (LSTM kernels differ in the last bits with/without grad)
    torch.testing.assert_close(table.encoder(), model.encoder(), atol=1e-5, rtol=0)


def test_encoder_file_from_other_adapter_is_refused(tmp_path):
    a = prompt.apply(tiny_base("llama"), PTuningConfig(num_virtual_tokens=4))
    b = prompt.apply(tiny_base("llama"), PTuningConfig(num_virtual_tokens=4))
    peft.save_adapter(a, tmp_path / "a")
    peft.save_adapter(b, tmp_path / "b")
    os.replace(tmp_path / "b" / prompt.ENCODER_FILE, tmp_path / "a" / prompt.ENCODER_FILE)
    with pytest.raises(ValueError, match="encoder's output differs from prompt_embeddings"):
        peft.load_adapter(tiny_base("llama"), tmp_path / "a")


@pytest.mark.parametrize("make, match", [
    (lambda: PromptConfig(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer, got 0"),
    (lambda: PTuningConfig(num_virtual_tokens=-1), "num_virtual_tokens must be a positive integer, got -1"),
    (lambda: PrefixConfig(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer, got 0"),
    (lambda: PromptConfig(init="vocab"), "init must be random | sample_vocab | text, got 'vocab'"),
    (lambda: PromptConfig(init="text", init_text="hi"), "init='text' needs init_text and tokenizer_name_or_path"),
    (lambda: PTuningConfig(encoder="gru"), "encoder must be mlp | lstm, got 'gru'"),
    (lambda: PTuningConfig(encoder_hidden_size=0), "encoder_hidden_size must be a positive integer"),
    (lambda: PrefixConfig(init_weights="ones"), "init_weights must be None or 'zero'"),
    (lambda: LlamaAdapterConfig(adapter_len=0), "adapter_len must be a positive integer, got 0"),
    (lambda: LlamaAdapterConfig(adapter_layers=0), "adapter_layers must be a positive integer, got 0"),
    (lambda: LlamaAdapterConfig(target_modules="attn"), "target_modules must be 'self_attn'"),
    (lambda: llama_adapter.apply(tiny_base("llama"), LlamaAdapterConfig(adapter_layers=3)),
     "adapter_layers=3 exceeds the model's 2 layers"),
    (lambda: PromptConfig.from_json({"peft_type": "LORA"}, "x/adapter_config.json"),
     "x/adapter_config.json: peft_type 'LORA' is not PROMPT_TUNING"),
])
def test_bad_config_is_one_line_error(make, match):
    with pytest.raises(ValueError, match=match.replace("|", r"\|").replace("(", r"\(")) as e:
        make()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["prompt_llama", "prefix_llama", "adapter_llama"])
def test_adapter_for_another_base_names_the_tensor(name):
    mt, mod, make = CASES[name]
    src = mod.apply(tiny_base(mt), make())
    big = Transformer(ModelConfig.from_hf(tiny_hf_config(mt, hidden_size=96, num_hidden_layers=2)))
    dst = mod.apply(big, make())
    key = next(iter(mod.export_state(src)))
    with pytest.raises(ValueError, match=f"adapter_model.safetensors: tensor {key} has shape") as e:
        mod.import_state(dst, mod.export_state(src))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="adapter_model.safetensors: missing tensor"):
        mod.import_state(dst, {})


@pytest.mark.slow
def test_real_smollm2_exports_load_in_hf_peft(tmp_path):
    """The real SmolLM2-135M (30 layers, GQA 9/3 heads, tied embeddings): every method's export reproduces our
    logits in HF PEFT."""
    from model.gguf import default_model
    path = str(default_model())
    cases = {"prompt": PromptConfig(num_virtual_tokens=5), "ptune": PTuningConfig(num_virtual_tokens=5),
             "prefix": PrefixConfig(num_virtual_tokens=5),
             "adapter": LlamaAdapterConfig(adapter_len=4, adapter_layers=30)}
    ids = torch.randint(3, 49152, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ours = {}
    for i, (name, cfg) in enumerate(cases.items()):
        m = peft.apply(load_pretrained(path), cfg)
        randomise(m, seed=i)
        peft.save_adapter(m, tmp_path / name, base_model_path=path)
        ours[name] = ours_logits(m, ids, mask, name)
    out = run_reference(f"""
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        x = load_file("in.safetensors")
        out = {{}}
        for name in {list(cases)}:
            pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{path}", dtype=torch.float32),
                                           name).eval()
            with torch.no_grad():
                out[name] = pm(input_ids=x["ids"], attention_mask=x["mask"]).logits
        save_file(out, "out.safetensors")
    """, tmp_path, {"ids": ids, "mask": mask})
    for name in cases:
        n = 5 if name in ("prompt", "ptune") else 0
        torch.testing.assert_close(real(ours[name], mask, n), real(out[name], mask, n), atol=1e-5, rtol=0)
