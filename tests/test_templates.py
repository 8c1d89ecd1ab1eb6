"""Built-in chat templates vs reference renderings of their formats, and prompt-loss masking vs transformers.

References (dev-only packages, run in a subprocess outside the repo by tests/reference.py):
  Llama 3   trl's copy of the original Llama 3 template (trl/chat_templates/llama3.jinja) and its training variant
            with {% generation %} tags (llama3_training.jinja), rendered by transformers' apply_chat_template
  Llama 2   FastChat's "llama-2" conversation template (fastchat.conversation), which leaves BOS to the tokenizer
  ChatML    FastChat's ChatML separator style ("OpenHermes-2.5-Mistral-7B" template)
  Alpaca    FastChat's "alpaca" template (the Stanford preamble and section names), whose only difference from
            Stanford Alpaca's prompt is "### Instruction: x" for "### Instruction:\\nx" (nanotune keeps Stanford's)
Our built-ins are rendered by transformers too (apply_chat_template(chat_template=...)), which checks our Jinja
environment against transformers' as well. Masks: ours (data.encode_record) against transformers'
`return_assistant_tokens_mask` on a copy of the template with {% generation %} around each answer + end of turn, and
ids against transformers' tokenisation of the rendered text, for a byte-level BPE and a sentencepiece tokenizer.
"""
import json
import random
import re

import pytest
import sentencepiece as spm

import data
import model as M
from model.tokenizer import BUILTIN_TEMPLATES, END_OF_TURN
from tests.reference import run_reference
from tests.tiny import make_tokenizer

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
S, U1, A1, U2, A2 = ({"role": r, "content": c} for r, c in [
    ("system", "You are Nano, a small helper."), ("user", "Who made you?"), ("assistant", "The nanotune project."),
    ("user", "And what is 2 + 3?"), ("assistant", "2 + 3 = 5.")])
CONVS = [[S, U1, A1, U2, A2], [U1, A1, U2, A2], [S, U1, A1, U2], [U1], [S, U1, A1], [U1, A1]]
SINGLE_TURN = [3, 4, 5]  # Alpaca is a single-turn format

# a template whose prefixes are not stable: the system prompt goes into the LAST user turn (as Mistral's v1 template
# does), so render(turns[:i]) is no prefix of the whole conversation and assistant_spans takes its fallback branch
UNSTABLE = (
    "{%- set ns = namespace(last=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}{{- bos_token -}}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
    "{{- '[INST] ' + (messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' and loop.index0 == ns.last"
    " else '') + m['content'] + ' [/INST]' -}}"
    "{%- elif m['role'] == 'assistant' -%}{% generation %}{{- m['content'] + eos_token -}}{% endgeneration %}"
    "{%- endif -%}{%- endfor -%}")
# the answer is quoted in its question: a fallback that searches the whole text would train the user's "yes"
QUOTED = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Say yes"},
          {"role": "assistant", "content": "yes"}, {"role": "user", "content": "Now say no"},
          {"role": "assistant", "content": "no"}]


def strip_generation(template: str) -> str:
    return template.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def with_generation(template: str, answer: str) -> str:
    """Our template with {% generation %} around the expression that renders an assistant answer."""
    assert template.count(answer) == 1, answer
    return template.replace(answer, "{% generation %}" + answer + "{% endgeneration %}")


LLAMA2_TAGGED = with_generation(BUILTIN_TEMPLATES["llama2"], "{{ ' ' + m['content'] | trim + ' ' + eos_token }}")


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    words = ("the model learns to answer short questions about cats dogs rivers numbers code tea music who made "
             "you what is and nano tune project helper small yes no say now word one").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))).capitalize() + "." for _ in range(n)]
    return lines + ["[INST] <<SYS>> [/INST] ### Instruction: Response: 2 + 3 = 5. Who made you? A B C"] * 20


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE (GPT-2 / Llama 3 style) trained here, with Llama 3's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("bpe")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=500, special_tokens=LLAMA3_SPECIALS,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "add_bos_token": False, "add_eos_token": False}))
    return d


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A sentencepiece BPE trained here with Llama 2's settings (identity normalisation, whitespace kept, dummy
    prefix, byte fallback, digits split), <s> / </s> as BOS / EOS and Llama 3's markers as user-defined symbols."""
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(corpus()))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=LLAMA3_SPECIALS[2:], minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    added = {str(sp.piece_to_id(t)): {"content": t, "special": True} for t in ["<unk>", "<s>", "</s>",
                                                                               *LLAMA3_SPECIALS[2:]]}
    # legacy: sentencepiece's own behaviour (a "▁" after special tokens too), as Llama 2's tokenizer.json has it
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True, "added_tokens_decoder": added}))
    return d


# (name, tokenizer fixture, our template (name or source), transformers' template with {% generation %} tags)
MASK_CASES = {
    "llama3_bpe": ("bpe_dir", "llama3", "trl:llama3_training.jinja"),
    "llama3_sentencepiece": ("sp_dir", "llama3", "trl:llama3_training.jinja"),
    "llama2_sentencepiece": ("sp_dir", "llama2", LLAMA2_TAGGED),
    "unstable_prefixes_fallback": ("bpe_dir", strip_generation(UNSTABLE), UNSTABLE),
}


@pytest.fixture(scope="module")
def hf(bpe_dir, sp_dir, tmp_path_factory):
    """Everything transformers / trl / FastChat say, computed in one reference subprocess."""
    work = tmp_path_factory.mktemp("ref")
    dirs = {"bpe_dir": str(bpe_dir), "sp_dir": str(sp_dir), "chatml_dir": str(make_tokenizer(work / "chatml"))}
    cases = {k: (dirs[d], BUILTIN_TEMPLATES.get(ours, ours), tagged) for k, (d, ours, tagged) in MASK_CASES.items()}
    (work / "in.json").write_text(json.dumps({"convs": CONVS, "builtin": BUILTIN_TEMPLATES, "dirs": dirs,
                                              "mask_cases": cases, "quoted": QUOTED,
                                              "single_turn": SINGLE_TURN}))
    run_reference("""
        import importlib.util
        from transformers import AutoTokenizer
        from fastchat.conversation import get_conv_template
        inp = json.load(open("in.json"))
        trl_dir = importlib.util.find_spec("trl").submodule_search_locations[0] + "/chat_templates/"
        trl = lambda name: open(trl_dir + name).read()
        toks = {k: AutoTokenizer.from_pretrained(d) for k, d in inp["dirs"].items()}
        fmt_tok = {"llama3": "bpe_dir", "llama2": "sp_dir", "alpaca": "sp_dir", "chatml": "chatml_dir"}

        def fastchat(name, msgs, gp):
            conv = get_conv_template(name)
            if msgs[0]["role"] == "system":
                conv.set_system_message(msgs[0]["content"])
                msgs = msgs[1:]
            for m in msgs:
                conv.append_message(conv.roles[m["role"] == "assistant"], m["content"])
            if gp:
                conv.append_message(conv.roles[1], None)
            return conv.get_prompt()

        out = {"ours": {}, "ref": {}, "masks": {}}
        for fmt, k in fmt_tok.items():
            tok = toks[k]
            for c, msgs in enumerate(inp["convs"]):
                for gp in (False, True):
                    key = f"{fmt}/{c}/{gp}"
                    out["ours"][key] = tok.apply_chat_template(msgs, chat_template=inp["builtin"][fmt],
                                                               tokenize=False, add_generation_prompt=gp)
                    if fmt == "llama3":
                        ref = tok.apply_chat_template(msgs, chat_template=trl("llama3.jinja"), tokenize=False,
                                                      add_generation_prompt=gp)
                    elif fmt == "llama2":  # FastChat's prompt starts after BOS and ends a closed turn with "<s>"
                        ref = tok.bos_token + fastchat("llama-2", msgs, msgs[-1]["role"] == "user")
                        ref = ref.removesuffix(tok.bos_token)
                    elif fmt == "chatml":
                        ref = fastchat("OpenHermes-2.5-Mistral-7B", msgs, gp) if msgs[0]["role"] == "system" else None
                    else:
                        ref = fastchat("alpaca", msgs, gp) if c in inp["single_turn"] else None
                    out["ref"][key] = ref
        for name, (d, ours, tagged) in inp["mask_cases"].items():
            tok = AutoTokenizer.from_pretrained(d)
            tagged = trl(tagged[4:]) if tagged.startswith("trl:") else tagged
            convs = [m for m in inp["convs"] if m[-1]["role"] == "assistant"] + [inp["quoted"]]
            res = []
            for msgs in convs:
                enc = tok.apply_chat_template(msgs, chat_template=tagged, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
                text = tok.apply_chat_template(msgs, chat_template=ours, tokenize=False)
                res.append({"msgs": msgs, "text": text, "ids": list(enc["input_ids"]),
                            "text_ids": tok(text, add_special_tokens=False)["input_ids"],
                            "mask": list(enc["assistant_masks"])})
            out["masks"][name] = res
        json.dump(out, open("out.json", "w"))
    """, work)
    return json.loads((work / "out.json").read_text())


def test_our_jinja_environment_renders_like_transformers(hf, bpe_dir, sp_dir, tmp_path):
    toks = {"llama3": M.load_tokenizer(bpe_dir), "llama2": M.load_tokenizer(sp_dir),
            "alpaca": M.load_tokenizer(sp_dir), "chatml": M.load_tokenizer(make_tokenizer(tmp_path))}
    for key, text in hf["ours"].items():
        fmt, c, gp = key.split("/")
        assert toks[fmt].apply_chat_template(CONVS[int(c)], gp == "True", template=fmt) == text, key


@pytest.mark.parametrize("fmt", ["llama3", "llama2", "chatml", "alpaca"])
def test_builtin_template_matches_reference_format(hf, fmt):
    checked = 0
    for key, ref in hf["ref"].items():
        if not key.startswith(fmt + "/") or ref is None:
            continue
        ours = hf["ours"][key]
        if fmt == "alpaca":  # FastChat writes "### Instruction: x"; Stanford Alpaca (and we) "### Instruction:\nx"
            ref = ref.replace("### Instruction: ", "### Instruction:\n").replace("### Response: ", "### Response:\n")
            ref = ref + "\n" if ref.endswith("### Response:") else ref
        assert ours == ref, key
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_prompt_masking_matches_transformers(hf, case, request):
    d, template, _ = MASK_CASES[case]
    tok = M.load_tokenizer(request.getfixturevalue(d))
    for ref in hf["masks"][case]:
        msgs = ref["msgs"]
        ex = data.encode_record(tok, "chat", msgs, seq_len=4096, template=template)[0]
        assert tok.apply_chat_template(msgs, template=template) == ref["text"]
        assert ex.ids.tolist() == ref["text_ids"] == ref["ids"]            # transformers' tokenisation
        assert ex.ids.tolist() == tok.encode(ref["text"], add_special_tokens=False)  # our tokenizer's
        assert ex.train.astype(int).tolist() == ref["mask"], (case, msgs)
        # trained: each answer and its end-of-turn token (the last trained token of each run), nothing of the
        # prompt (the user's quoted "yes" included)
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        runs = [r for r in "".join("1" if t else "0" for t in ex.train).split("0") if r]
        assert len(runs) == len(answers)
        ends = [i for i in range(len(ex.ids)) if ex.train[i] and (i + 1 == len(ex.ids) or not ex.train[i + 1])]
        assert all(int(ex.ids[i]) in tok.stop_ids for i in ends)
        trained = tok.decode(ex.ids[ex.train].tolist(), skip_special_tokens=False)
        assert re.sub("|".join(map(re.escape, END_OF_TURN)), " ", trained).split() == " ".join(answers).split()


def test_unstable_template_takes_the_fallback_branch(bpe_dir):
    """The masking case above is only a test of the fallback if the prefixes really are unstable."""
    tok = M.load_tokenizer(bpe_dir)
    tmpl = strip_generation(UNSTABLE)
    text = tok.apply_chat_template(QUOTED, template=tmpl)
    assert not text.startswith(tok.apply_chat_template(QUOTED[:2], True, template=tmpl))
    full, spans = data.assistant_spans(tok, QUOTED, tmpl)
    assert [full[a:b] for a, b in spans] == ["yes<|eot_id|>", "no<|eot_id|>"]
    assert full.index("Say yes") < spans[0][0]


def test_sentencepiece_offsets_non_ascii(sp_dir):
    """Sentencepiece offsets are bytes: answers after multi-byte characters (and byte-fallback pieces) still mask
    exactly the answer."""
    tok = M.load_tokenizer(sp_dir)
    msgs = [{"role": "user", "content": "Café, 日本語 🙂?"}, {"role": "assistant", "content": "Ja, très 🙂 bien."},
            {"role": "user", "content": "ö"}, {"role": "assistant", "content": "Ü ß"}]
    for template in ("llama2", "llama3", "alpaca"):
        text = tok.apply_chat_template(msgs, template=template)
        ex = data.encode_record(tok, "chat", msgs, seq_len=4096, template=template)[0]
        assert ex.ids.tolist() == tok.encode(text, add_special_tokens=False)
        edges = [i + 1 for i in range(len(ex.ids) - 1) if ex.train[i] != ex.train[i + 1]]
        runs = [ex.ids[a:b].tolist() for a, b in zip([0, *edges], [*edges, len(ex.ids)]) if ex.train[a]]
        eot = "|".join(map(re.escape, END_OF_TURN))  # sentencepiece drops </s> when decoding, not <|eot_id|>
        assert [re.sub(eot, "", tok.decode(r)).strip() for r in runs] == ["Ja, très 🙂 bien.", "Ü ß"], template
        assert all(r[-1] in tok.stop_ids for r in runs)


def test_each_template_is_compiled_once(bpe_dir):
    from model.tokenizer import _compiled
    tok = M.load_tokenizer(bpe_dir)
    _compiled.cache_clear()
    for _ in range(3):
        data.encode_record(tok, "chat", CONVS[0], seq_len=4096, template="llama3")
    assert (_compiled.cache_info().misses, _compiled.cache_info().hits) == (1, 2)  # one lookup a record
