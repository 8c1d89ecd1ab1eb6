"""Tiny self-contained fixtures for the data/train tests: a character-level tokenizer that transformers can load
(ChatML special tokens, pad != eos, SmolLM2's chat template with its default system prompt) and tiny random
llama checkpoints written by our own save_pretrained (no download, no subprocess)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

import model as M

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]  # ids 0..3: pad 0, bos 1, eos 2 (tiny_hf_config)
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]           # ids 4..99
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny helper.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tokenizer(path) -> Path:
    """A char-level BPE (no merges) tokenizer.json + tokenizer_config.json in `path`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
           "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False,
           "chat_template": CHATML_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return path


def tiny_config(**over) -> dict:
    d = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
         "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False,
         "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
         "architectures": ["LlamaForCausalLM"]}
    d.update(over)
    return d


def make_model(path, seed: int = 0, **over) -> Path:
    """A tiny random llama HF directory (config.json + model.safetensors + the char tokenizer)."""
    path = Path(path)
    model = M.Transformer(M.ModelConfig.from_hf(tiny_config(**over)))
    model.init_weights(0.1, seed)
    M.save_pretrained(model, path)
    make_tokenizer(path)
    return path


def write_jsonl(path, records) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_inputs(d, n_records: int, **model_over) -> dict:
    """What a tiny train.py run needs in directory d: {"dir", "model" (seed 1), "data" (n chat records, seed 2)}."""
    return {"dir": d, "model": str(make_model(d / "m", seed=1, **model_over)),
            "data": str(write_jsonl(d / "train.jsonl", chat_records(n_records, seed=2)))}


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """n sharegpt/alpaca/messages records of varied (uneven) lengths."""
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "nano", "tune", "cat", "dog", "sun", "moon"]

    def sent(k):
        return " ".join(words[int(i)] for i in torch.randint(len(words), (k,), generator=g))
    out = []
    for i in range(n):
        q, a = sent(2 + i % 5), sent(1 + (3 * i) % 7)
        if i % 3 == 0:
            out.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
        elif i % 3 == 1:
            out.append({"instruction": q, "input": sent(1) if i % 2 else "", "output": a})
        else:
            out.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                                     {"role": "assistant", "content": a}]})
    return out


REPO = Path(__file__).resolve().parent.parent


def run_train(argv, patch: str = "", ranks: int = 0, check: bool = True, timeout: int = 300):
    """train.main(argv) in a fresh process (`patch`: Python run first, e.g. a monkeypatch), or under torchrun on
    `ranks` gloo ranks (a free port each launch; once more if another process took it). -> CompletedProcess."""
    code = "import os, signal, sys, time, torch; sys.path.insert(0, %r); import train\n%s\ntrain.main(%r)\n" % (
        str(REPO), patch, argv)
    cmd = [sys.executable, "-c", code]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        if ranks:
            script = Path(argv[argv.index("--out") + 1] + ".py")
            script.parent.mkdir(parents=True, exist_ok=True)
            script.write_text(code)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                   str(port), str(script)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env)
        if not ranks or "address already in use" not in r.stderr.lower():
            break
    if check and r.returncode != 0:
        raise AssertionError(r.stderr[-3000:])
    return r
