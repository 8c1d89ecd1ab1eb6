"""tokenizer.model (sentencepiece) loading and the built-in chat templates."""
import json

import pytest
import sentencepiece as spm

from model import load_tokenizer
from model.gguf import default_model

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is a tiny corpus.",
          "日本語 テキスト", "numbers 123 456 [INST] tags"] * 50


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1,
                                   eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "unk_token": "<unk>", "add_bos_token": True}))
    return d


def test_sentencepiece_encode_matches_processor(sp_dir):
    tok = load_tokenizer(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    for s in ["Hello world", "The fox 日本 🙂", "a  b"]:
        assert tok.encode(s) == [1] + sp.encode(s)          # BOS from add_bos_token, then sentencepiece
        assert tok.encode(s, add_special_tokens=False) == sp.encode(s)
        assert tok.decode(tok.encode(s)) == sp.decode(sp.encode(s))  # sp normalises whitespace
    # special tokens written in the text become their ids instead of being spelled out piece by piece
    assert tok.encode("<s>Hello</s>", add_special_tokens=False) == [1] + sp.encode("Hello") + [2]
    assert tok.stop_ids == {2}


def test_builtin_chatml_equals_smollm2_template_with_system():
    """SmolLM2's own template is ChatML plus a default system message: with an explicit system message both
    must render identically."""
    tok = load_tokenizer(default_model())
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    for gp in (False, True):
        assert tok.apply_chat_template(conv, gp, template="chatml") == tok.apply_chat_template(conv, gp)


def test_builtin_templates_render(sp_dir):
    tok = load_tokenizer(sp_dir)
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    assert tok.apply_chat_template(conv, template="llama2") == \
        "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]"
    assert tok.apply_chat_template(conv, True, template="llama3") == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "U1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nU2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.apply_chat_template(conv[1:3], template="alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nU1\n\n### Response:\nA1</s>")
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(conv)
