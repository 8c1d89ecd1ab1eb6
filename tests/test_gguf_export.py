"""GGUF export (export.py, quant/ggml.py): our Q8_0/Q4_0 bytes equal the gguf package's reference
quantize; every exported type read back by transformers' own GGUF loader (an independent reader) gives our
logits; our importer round-trips the weights (the q/k permutation is the importer's inverse); the tokenizer
read from the file (by us and by transformers) gives the original ids; adapters are merged first; what can't be
written is refused in one line, with nothing written."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import model as M
import peft
import export as gguf_export  # the top-level export.py
from export import TYPES, export
from quant import ggml
from tests.peft_cases import randomize
from tests.reference import run_reference
from tests.tiny import REPO, SPECIALS, make_model

TEXTS = ["Hello world, 12345 apples!", "  indented\n\ttabs and\nnewlines", "café ünïcödé 日本語 🙂",
         "<|im_start|>user\nhi<|im_end|>\n", "it's 3.14159, isn't it? 'quoted' words"]
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 17, 260, 3], [3, 44, 8, 12, 120, 7, 6, 90, 11, 250]])
# per-weight error bound of each type, as a multiple of |w| (floats: half an ulp, plus the subnormal floor) or
# of the block's absmax (blocks: half a step, Q4_0 a whole step for the value opposite the extreme, which
# clips from 16 to 15; plus the fp16 rounding of the scale d, 2**-11 relative, times the largest code)
RELATIVE = {"f32": 0.0, "f16": 2.0 ** -11, "bf16": 2.0 ** -8}
ABSMAX = {"q8_0": (0.5 + 127 * 2.0 ** -11) / 127, "q4_0": (1 + 8 * 2.0 ** -11) / 8}


def make_bpe_tokenizer(path):
    """A byte-level BPE tokenizer trained on a few sentences (SmolLM2's pre-tokenizer: digits split, then GPT-2),
    the ChatML specials first, written over tiny.make_model's char tokenizer (same tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog, the end", "hello world " * 3] * 20,
                            trainer)
    tok.save(str(path / "tokenizer.json"))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf_export")
    out = {"tmp": tmp, "files": {}}
    base = make_model(tmp / "llama", seed=3, vocab_size=320)
    out["n_tokens"] = make_bpe_tokenizer(base)
    for arch, over in (("qwen2", {"model_type": "qwen2", "tie_word_embeddings": True}),
                       ("qwen3", {"model_type": "qwen3", "head_dim": 128})):  # transformers' qwen3 GGUF: 128
        d = make_model(tmp / arch, seed=4, vocab_size=320, **over)
        make_bpe_tokenizer(d)
        if arch == "qwen2":  # random biases: they must be written
            m = M.load_pretrained(d)
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if n.endswith("bias"):
                        p.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
            M.save_pretrained(m, d)
        out["files"][arch] = export(d, tmp / f"{arch}.gguf", "f32")
        out[arch] = d
    out["base"] = base
    for kind in TYPES:
        out["files"][kind] = export(base, tmp / f"{kind}.gguf", kind)
    # a LoRA adapter (random B, so it changes the output), merged by the export
    m = peft.apply(M.load_pretrained(base), peft.LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize(m, seed=7)
    peft.save_adapter(m, tmp / "lora", base_model_path=str(base))
    with torch.no_grad():
        out["lora_logits"] = m(IDS)
    out["files"]["lora"] = export(base, tmp / "lora.gguf", "f32", adapter=tmp / "lora")
    out["tok"] = M.load_tokenizer(base)
    texts = TEXTS + [out["tok"].apply_chat_template([{"role": "user", "content": "2+2?"}], True)]
    out["texts"] = texts
    files = {k: str(v) for k, v in out["files"].items()}
    out["hf"] = run_reference(f"""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        files, texts = {files!r}, {texts!r}
        ids = load_file("in.safetensors")["ids"]
        out, toks = {{}}, {{}}
        for k, f in files.items():
            m = AutoModelForCausalLM.from_pretrained(os.path.dirname(f), gguf_file=os.path.basename(f),
                                                     dtype=torch.float32).eval()
            with torch.no_grad():
                out[k] = m(ids).logits
            if k == "f32":
                t = AutoTokenizer.from_pretrained(os.path.dirname(f), gguf_file=os.path.basename(f))
                toks = {{"ids": [t.encode(x, add_special_tokens=False) for x in texts],
                         "bos": t.bos_token_id, "eos": t.eos_token_id, "template": t.chat_template}}
        save_file({{k: v.contiguous() for k, v in out.items()}}, "out.safetensors")
        json.dump(toks, open("tok.json", "w"))
    """, tmp / "ref", inputs={"ids": IDS})
    out["hf_tok"] = json.loads((tmp / "ref" / "tok.json").read_text())
    return out


def test_blocks_equal_gguf_reference_bytes():
    from gguf import GGMLQuantizationType as T
    from gguf import quants
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=g) * torch.logspace(-3, 2, 48)[:, None]
    w[0, :32] = 0                                    # an all-zero block: d = 0
    w[1, :32] = 0.25                                 # a constant block: ties for the absmax
    w[2, 40] = -w[2, 32:64].abs().max() * 2          # a negative extreme: Q4_0's d keeps its sign
    w[3, :32] = torch.arange(32) / 2 - 8             # exact halves: roundf rounds away from zero
    for kind, t in (("q8_0", T.Q8_0), ("q4_0", T.Q4_0)):
        ours, theirs = ggml.QUANTIZE[kind](w).numpy(), quants.quantize(w.numpy(), t)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
        assert (ours == theirs).all(), kind
        back = ggml.dequantize(torch.from_numpy(theirs), kind, 128).numpy()
        np.testing.assert_array_equal(back, quants.dequantize(theirs, t))
    with pytest.raises(ValueError, match="multiple of 32"):
        ggml.quantize_q8_0(torch.zeros(4, 40))


@pytest.mark.parametrize("kind", TYPES)
def test_transformers_gguf_loader_gives_our_logits(ref, kind):
    """transformers' reader of our file == our reader of it (≤ 1e-4, any type), and both are within the type's
    rounding of the fp32 model."""
    ours = M.load_pretrained(ref["files"][kind])
    with torch.no_grad():
        mine, full = ours(IDS), M.load_pretrained(ref["base"])(IDS)
    theirs = ref["hf"][kind]
    assert (theirs - mine).abs().max() <= 1e-4
    print(f"{kind}: max |logit error| vs fp32 = {(theirs - full).abs().max().item():.2e} "
          f"(logits std {full.std().item():.2f})")


@pytest.mark.parametrize("kind", TYPES)
def test_weights_within_the_types_rounding(ref, kind):
    """Every weight read back from the file is within its type's documented rounding of the original."""
    sd = M.load_pretrained(ref["base"]).state_dict()
    back = M.load_pretrained(ref["files"][kind]).state_dict()
    for k, w in sd.items():
        err = (back[k] - w).abs()
        if w.dim() == 1 or kind in RELATIVE:
            bound = w.abs() * RELATIVE.get(kind if w.dim() == 2 else "f32") + (2.0 ** -25 if w.dim() == 2 else 0)
        else:
            absmax = w.reshape(-1, 32).abs().amax(1, keepdim=True).expand(-1, 32).reshape(w.shape)
            bound = absmax * ABSMAX[kind] * (1 + 1e-6) + 1e-9
        assert (err <= bound).all(), (kind, k, (err - bound).max().item())


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_architectures(ref, arch):
    with torch.no_grad():
        full = M.load_pretrained(ref[arch])(IDS)
    assert (ref["hf"][arch] - full).abs().max() <= 1e-4


def test_importer_round_trips_weights(ref):
    """f32: every tensor back bit for bit (q/k rows un-permuted by the importer = our permutation's inverse);
    q8_0 / q4_0: each 2-D weight is exactly the dequantization of our own blocks."""
    sd = M.load_pretrained(ref["base"]).state_dict()
    back = M.load_pretrained(ref["files"]["f32"]).state_dict()
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    for kind in ("q8_0", "q4_0"):
        q = M.load_pretrained(ref["files"][kind]).state_dict()
        for k in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
            w = sd[k]
            assert torch.equal(q[k], ggml.dequantize(ggml.QUANTIZE[kind](w), kind, w.shape[1])), (kind, k)


def test_tokenizer_from_file_gives_original_ids(ref):
    tok = ref["tok"]
    back = M.load_tokenizer(ref["files"]["f32"])
    for i, text in enumerate(ref["texts"]):
        want = tok.encode(text, add_special_tokens=False)
        assert back.encode(text, add_special_tokens=False) == want, text
        assert ref["hf_tok"]["ids"][i] == want, text
        assert back.decode(want, skip_special_tokens=False) == tok.decode(want, skip_special_tokens=False)
    assert (back.bos_id, back.eos_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert (ref["hf_tok"]["bos"], ref["hf_tok"]["eos"]) == (tok.bos_id, tok.eos_id)
    assert back.chat_template == ref["hf_tok"]["template"] == tok.chat_template
    from gguf import GGUFReader
    f = GGUFReader(str(ref["files"]["f32"])).fields
    assert f["tokenizer.ggml.pre"].contents() == "smollm" and f["tokenizer.ggml.model"].contents() == "gpt2"
    types = f["tokenizer.ggml.token_type"].contents()
    assert types[:4] == [3, 3, 3, 3] and types[-1] == 5 and len(types) == 320   # CONTROL specials, UNUSED pads
    assert f["llama.context_length"].contents() == 512 and f["general.file_type"].contents() == 0


def test_adapter_merged_before_export(ref):
    with torch.no_grad():
        ours = M.load_pretrained(ref["files"]["lora"])(IDS)
        base = M.load_pretrained(ref["base"])(IDS)
    assert (ours - ref["lora_logits"]).abs().max() <= 1e-4
    assert (ref["hf"]["lora"] - ref["lora_logits"]).abs().max() <= 1e-4
    assert (base - ref["lora_logits"]).abs().max() > 1e-2  # the adapter changed the answer


@pytest.mark.parametrize("method", ["dora", "ia3", "qlora"])
def test_other_adapters_merged(ref, tmp_path, method):
    base = ref["base"]
    if method == "qlora":
        from quant import qlora
        m = qlora.load_qlora(base, peft.LoraConfig(r=4, alpha=8, targets="all-linear"))
    else:
        cfg = peft.LoraConfig(r=4, targets="all-linear", dora=True) if method == "dora" else peft.IA3Config()
        m = peft.apply(M.load_pretrained(base), cfg)
    randomize(m, seed=8)
    peft.save_adapter(m, tmp_path / "a", base_model_path=str(base))
    with torch.no_grad():
        want = m(IDS)
    export(base, tmp_path / "x.gguf", "f32", adapter=tmp_path / "a", qlora=method == "qlora")
    with torch.no_grad():
        got = M.load_pretrained(tmp_path / "x.gguf")(IDS)
    assert (got - want).abs().max() <= 1e-4


def refusal(*args) -> str:
    """The one-line message `python export.py ARGS` exits with (its main, in-process)."""
    with pytest.raises(SystemExit) as e:
        gguf_export.main([str(a) for a in args])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    return msg


def test_refusals_are_one_line_and_write_nothing(ref, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"old")
    cases = {}
    for name, over in (("gemma", {}), ("rope", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64}}),
                       ("mistral", {"model_type": "mistral", "sliding_window": 16}),
                       ("bias", {"attention_bias": True})):
        cases[name] = make_model(tmp_path / name, **over)     # char-level tokenizer (not byte-level)
    make_bpe_tokenizer(cases["bias"])
    cfg = json.loads((cases["gemma"] / "config.json").read_text())
    (cases["gemma"] / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma"}))
    # gemma loads (model/gemma.py) but llama.cpp's gemma tensors are not written by export.py
    expect = {"gemma": "model_type 'gemma' has no GGUF architecture here", "mistral": "sliding_window=16",
              "rope": "rope_scaling 'llama3' is not written",
              "bias": "with attention/MLP biases"}
    for name, d in cases.items():
        assert expect[name] in refusal(d, out, "--type", "q8_0")
    assert "not byte-level BPE" in refusal(make_model(tmp_path / "char"), out)
    assert out.read_bytes() == b"old" and not (tmp_path / "x.gguf.tmp").exists()
    prefix = peft.apply(M.load_pretrained(ref["base"]), peft.PrefixConfig(num_virtual_tokens=2))
    peft.save_adapter(prefix, tmp_path / "prefix", base_model_path=str(ref["base"]))
    assert "can't be merged" in refusal(ref["base"], out, "--adapter", tmp_path / "prefix")
    assert out.read_bytes() == b"old"


def test_cli_writes_q4_0(ref, tmp_path):
    r = subprocess.run([sys.executable, "export.py", str(ref["base"]), str(tmp_path / "m.gguf"),
                        "--type", "q4_0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.gguf").read_bytes() == ref["files"]["q4_0"].read_bytes()


@pytest.mark.slow
def test_smollm2_lora_export_answers_like_nanotune(tmp_path):
    """SmolLM2-135M-Instruct + a LoRA adapter (the default run's settings, r=16 on every linear; random weights
    standing in for a fine-tune), exported f32: transformers' GGUF loader answers the held-out questions with
    nanotune's greedy tokens (prompt ids from the file's tokenizer equal ours too)."""
    from data import read_records
    from model.gguf import default_model
    from model.sampling import generate
    base = default_model()
    tok = M.load_tokenizer(base)
    m = peft.apply(M.load_pretrained(base), peft.LoraConfig(r=16, alpha=32, targets="all-linear"))
    randomize(m, seed=1)
    with torch.no_grad():  # a gentle update: the answers change, but stay text
        for n, p in peft.core.adapter_parameters(m).items():
            p.mul_(0.3)
    peft.save_adapter(m, tmp_path / "lora", base_model_path=str(base))
    chats = [c[:1] for _, kind, c in read_records([REPO / "data/default/heldout.jsonl"]) if kind == "chat"][:2]
    prompts = [tok.encode(tok.apply_chat_template(c, add_generation_prompt=True), add_special_tokens=False)
               for c in chats]
    ours = [generate(m, p, 16, tok.stop_ids) for p in prompts]
    f = export(base, tmp_path / "smol.gguf", "f32", adapter=tmp_path / "lora")
    texts = [tok.apply_chat_template(c, add_generation_prompt=True) for c in chats]
    r = run_reference(f"""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        f, texts, stop = {str(f)!r}, {texts!r}, {sorted(tok.stop_ids)!r}
        t = AutoTokenizer.from_pretrained(os.path.dirname(f), gguf_file=os.path.basename(f))
        m = AutoModelForCausalLM.from_pretrained(os.path.dirname(f), gguf_file=os.path.basename(f),
                                                 dtype=torch.float32).eval()
        out = {{}}
        for i, x in enumerate(texts):
            ids = torch.tensor([t.encode(x, add_special_tokens=False)])
            g = m.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
            out[f"prompt{{i}}"], out[f"answer{{i}}"] = ids[0], g[0, ids.shape[1]:]
        save_file(out, "out.safetensors")
    """, tmp_path / "ref")
    plain = M.load_pretrained(base)
    for i, p in enumerate(prompts):
        assert r[f"prompt{i}"].tolist() == p
        answer = [t for t in r[f"answer{i}"].tolist() if t not in tok.stop_ids]
        assert answer == ours[i], (tok.decode(answer), tok.decode(ours[i]))
        print(f"Q: {chats[i][0]['content']}\n  A: {tok.decode(ours[i])}")
    assert any(generate(plain, p, 16, tok.stop_ids) != o for p, o in zip(prompts, ours))  # the adapter matters
