"""Hostile or malformed model, adapter, GGUF and config files, and bad generate.py flags: each is a one-line error
naming the file (and the key or tensor), found before anything is built from it.

Every hostile file of the table HOSTILE is loaded twice: in-process (the ValueError's message), and by generate.py's
main in a subprocess under a 3 GB address-space cap with 10 s per file, where a size allocated before it is checked
or a count that is looped over fails (MemoryError, the timeout) instead of passing slowly. One subprocess runs all of
them (one torch import); a few run as the real CLI, each in a fresh process, exit code and stderr as a user sees."""
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import generate
import model as M
import peft
from model.gguf import TENSOR_NAMES
from tests.test_peft_errors import one_line_error as one_line
from tests.tiny import make_model

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
MEMORY_CAP = 3 * 2**30


# ---- inputs: a tiny llama HF dir, adapters over it, the same model as a GGUF file -----------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """{"model", "lora", "ptuning", "gguf"}: good files, copied by each test before it breaks them."""
    d = tmp_path_factory.mktemp("pristine")
    path = make_model(d / "model")
    base = M.load_pretrained(path)
    out = {"model": path, "gguf": write_gguf(d / "tiny.gguf", base)}
    for name, cfg in (("lora", peft.LoraConfig(r=8, targets="all-linear")),
                      ("ptuning", peft.PTuningConfig(num_virtual_tokens=4))):
        out[name] = peft.save_adapter(peft.apply(M.load_pretrained(path), cfg), d / name, base_model_path=str(path))
    return out


def copy(pristine, tmp_path, name) -> Path:
    src = pristine[name]
    dst = tmp_path / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def edit_json(file: Path, **changes):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def truncate(file: Path):
    file.write_bytes(file.read_bytes()[: file.stat().st_size * 2 // 3])


def write_gguf(path: Path, model, **meta) -> Path:
    """`model` as a llama GGUF file the way llama.cpp's converter writes it (q/k rows permuted to interleaved
    pairs, fp32 tensors, a byte-level vocabulary); `meta` overrides metadata (None drops a key)."""
    from gguf import GGUFWriter
    c = model.cfg
    fields = {"llama.block_count": c.num_hidden_layers, "llama.embedding_length": c.hidden_size,
              "llama.feed_forward_length": c.intermediate_size, "llama.attention.head_count": c.num_attention_heads,
              "llama.attention.head_count_kv": c.num_key_value_heads, "llama.context_length": 512,
              "llama.attention.layer_norm_rms_epsilon": c.rms_norm_eps, "llama.rope.freq_base": c.rope_theta,
              "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [chr(33 + i) for i in range(c.vocab_size)],
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    fields.update(meta)
    w = GGUFWriter(str(path), "llama")
    for k, v in fields.items():
        add = {str: w.add_string, list: w.add_array, float: w.add_float32}.get(type(v), w.add_uint32)
        if v is not None:
            add(k, v)
    to_gguf = {h.format(i=i): g.format(i=i) for i in range(c.num_hidden_layers) for g, h in TENSOR_NAMES.items()}
    for k, v in model.state_dict().items():
        if k.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's permute, undone by gguf.unpermute_qk
            n = c.num_attention_heads if k.endswith("q_proj.weight") else c.num_key_value_heads
            v = v.reshape(n, 2, v.shape[0] // n // 2, -1).transpose(1, 2).reshape(v.shape)
        w.add_tensor(to_gguf[k], np.ascontiguousarray(v.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_the_untouched_files_load_and_the_gguf_is_the_same_model(pristine):
    """The baseline: every hostile case below breaks one thing in files that load. (And the GGUF writer above is
    right: its file gives the HF dir's logits exactly.)"""
    hf = M.load_pretrained(pristine["model"])
    gg = M.load_pretrained(pristine["gguf"])
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.equal(hf(ids), gg(ids))
    assert M.load_tokenizer(pristine["gguf"]).encode("abc") == [64, 65, 66]
    for name in ("lora", "ptuning"):
        peft.load_adapter(M.load_pretrained(pristine["model"]), pristine[name])



# ---- the hostile files: each a build(pristine, tmp) -> (path named by the error, load, generate.py's args) ------

def model_dir(path):
    return path, lambda: M.load_pretrained(path), ["--model", str(path)]


def adapter_dir(pristine, path):
    return path, lambda: peft.load_adapter(M.load_pretrained(pristine["model"]), path), \
        ["--model", str(pristine["model"]), "--adapter", str(path)]


def config(**changes):
    def build(p, tmp):
        path = copy(p, tmp, "model")
        edit_json(path / "config.json", **changes)
        return model_dir(path)
    return build


def config_bytes(text: bytes):
    def build(p, tmp):
        path = copy(p, tmp, "model")
        (path / "config.json").write_bytes(text)
        return model_dir(path)
    return build


def adapter(name, **changes):
    def build(p, tmp):
        path = copy(p, tmp, name)
        edit_json(path / "adapter_config.json", **changes)
        return adapter_dir(p, path)
    return build


def adapter_bytes(name, file, text: bytes | None = None):
    """`file` of adapter `name` replaced by `text`, or truncated (None)."""
    def build(p, tmp):
        path = copy(p, tmp, name)
        truncate(path / file) if text is None else (path / file).write_bytes(text)
        return adapter_dir(p, path)
    return build


def truncated_model(p, tmp):
    path = copy(p, tmp, "model")
    truncate(path / "model.safetensors")
    return model_dir(path)


def gguf(**meta):
    def build(p, tmp):
        tmp.mkdir(parents=True, exist_ok=True)
        path = write_gguf(tmp / "bad.gguf", M.load_pretrained(p["model"]), **meta)
        if "tokenizer.ggml.bos_token_id" in meta:  # the model is fine, the tokenizer is not
            return path, lambda: M.load_tokenizer(path), ["--model", str(path)]
        return model_dir(path)
    return build


def case(build, *parts, id):
    return pytest.param(build, parts, id=id)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
HOSTILE = [
    # config.json: types, sizes, heads, rope scaling; the layer count and shapes against the stored tensors
    case(config(num_hidden_layers=100000), "config.json: num_hidden_layers is 100000 but the weights hold 2 layers",
         id="layers-100000"),
    case(config(num_hidden_layers=1e5), "num_hidden_layers must be an integer, got 100000.0", id="layers-1e5"),
    case(config(num_key_value_heads=0), "num_key_value_heads must be a positive integer", id="kv-heads-0"),
    case(config(hidden_size=-64), "hidden_size must be a positive integer", "-64", id="hidden-negative"),
    case(config(intermediate_size=2**40), "intermediate_size must be a positive integer (at most 16777216)",
         id="intermediate-2**40"),
    case(config(vocab_size="128"), "vocab_size must be an integer, got '128'", id="vocab-string"),
    case(config(intermediate_size=64.5), "intermediate_size must be an integer, got 64.5", id="intermediate-float"),
    case(config(num_attention_heads=5), "hidden_size=32 is not a multiple of num_attention_heads=5",
         id="heads-not-dividing"),
    case(config(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3",
         id="kv-heads-not-dividing"),
    case(config(head_dim=7), "head_dim=7 is odd", id="head-dim-odd"),
    case(config(rope_scaling={"rope_type": "llama3"}), "rope_scaling of type llama3 needs factor",
         id="llama3-no-factor"),
    case(config(rope_scaling={k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}),
         "rope_scaling of type llama3 needs original_max_position_embeddings", id="llama3-no-context"),
    case(config(rope_scaling={**LLAMA3, "low_freq_factor": 4.0}), "high_freq_factor=4.0 must be greater",
         id="llama3-empty-band"),
    case(config(rope_scaling={"type": "linear", "factor": "2"}), "rope_scaling.factor must be a finite number > 0",
         id="linear-factor-string"),
    case(config(rope_scaling={"type": "mrope", "factor": 2.0}), "rope_scaling type 'mrope' is not supported",
         id="rope-mrope"),
    case(config(rope_scaling="llama3"), "rope_scaling must be an object or null, got 'llama3'", id="rope-string"),
    case(config(tie_word_embeddings="false"), "tie_word_embeddings must be true or false, got 'false'",
         id="tie-string"),
    case(config(attention_bias="no"), "attention_bias must be true or false", id="bias-string"),
    case(config(rms_norm_eps=0), "rms_norm_eps must be a finite number > 0", id="eps-0"),
    case(config(rope_theta=-1.0), "rope_theta must be a finite number > 0", id="theta-negative"),
    case(config(eos_token_id=[2, "x"]), "eos_token_id must be a token id", id="eos-string"),
    case(config(hidden_act=["silu"]), "hidden_act must be a string", id="act-list"),
    case(config(max_position_embeddings=0), "max_position_embeddings must be a positive integer", id="context-0"),
    case(config(intermediate_size=80), "model.layers.0.mlp.gate_proj.weight has shape (64, 32)", "implies (80, 32)",
         id="shape-mismatch"),
    case(config_bytes(b"[1, 2]"), "config.json: expected a JSON object, got list", id="config-list"),
    case(config_bytes(b'{"model_type": "llama\xff"}'), "config.json: invalid JSON", id="config-not-utf8"),
    case(truncated_model, "model.safetensors: corrupt safetensors file", id="model-truncated"),
    # adapter_config.json against its fields' types and the stored tensors; truncated tensor files
    case(adapter("lora", r=10000000), "adapter_model.safetensors", "lora_A.weight has shape (8, 32)",
         "(10000000, 32)", id="lora-r-1e7"),
    case(adapter("lora", r=4), "lora_A.weight has shape (8, 32)", "gives (4, 32)", id="lora-r-4-over-8"),
    case(adapter("lora", r="8"), "adapter_config.json: r must be an integer, got '8'", id="lora-r-string"),
    case(adapter("lora", r=True), "adapter_config.json: r must be an integer, got True", id="lora-r-bool"),
    case(adapter("lora", r=0), "adapter_config.json: r must be a positive integer", id="lora-r-0"),
    case(adapter("lora", lora_alpha="16"), "adapter_config.json: lora_alpha must be a finite number, got '16'",
         id="lora-alpha-string"),
    case(adapter("lora", lora_alpha=float("nan")), "adapter_config.json: lora_alpha must be a finite number",
         id="lora-alpha-nan"),
    case(adapter("lora", lora_dropout=1.5), "adapter_config.json", "dropout must be in [0, 1)", id="dropout-1.5"),
    case(adapter("lora", target_modules=123), "adapter_config.json: target_modules must be a list of strings or a "
         "string", id="targets-int"),
    case(adapter("lora", target_modules=["q_proj", 1]), "target_modules must be a list of strings",
         id="targets-mixed"),
    case(adapter("lora", target_modules=["qkv"]), "adapter_config.json", "no linear module named 'qkv'",
         id="targets-unknown"),
    case(adapter("lora", use_rslora="false"), "adapter_config.json: use_rslora must be true or false, got 'false'",
         id="rslora-string"),
    case(adapter("lora", use_dora="true"), "adapter_config.json: use_dora must be true or false, got 'true'",
         id="dora-string"),
    case(adapter("lora", base_model_name_or_path=5), "base_model_name_or_path must be a string", id="base-int"),
    case(adapter("lora", peft_type=["LORA"]), "adapter_config.json: unknown peft_type ['LORA']", id="type-list"),
    case(adapter_bytes("lora", "adapter_config.json", b'["LORA"]'), "adapter_config.json: expected a JSON object",
         id="adapter-config-list"),
    case(adapter_bytes("lora", "adapter_model.safetensors"), "adapter_model.safetensors: corrupt safetensors file",
         id="adapter-truncated"),
    case(adapter_bytes("ptuning", "prompt_encoder.safetensors"), "prompt_encoder.safetensors: corrupt safetensors",
         id="encoder-truncated"),
    case(adapter("ptuning", encoder_hidden_size=10000000), "adapter_config.json", "GB of adapter parameters, more",
         id="ptuning-width-1e7"),
    case(adapter("ptuning", encoder_num_layers=2**30), "encoder_num_layers must be a positive integer",
         id="ptuning-layers-2**30"),
    case(adapter("ptuning", encoder_num_layers=5000, encoder_reparameterization_type="LSTM"),
         "adapter_config.json", "encoder_num_layers must be at most 1024", id="ptuning-lstm-5000-layers"),
    case(adapter("ptuning", num_virtual_tokens=10000000), "prompt_embeddings has shape (4, 32)", "(10000000, 32)",
         id="ptuning-tokens-1e7"),
    case(adapter("ptuning", num_virtual_tokens="4"), "num_virtual_tokens must be an integer", id="tokens-string"),
    case(adapter("ptuning", encoder_dropout="0"), "encoder_dropout must be a finite number", id="dropout-string"),
    # GGUF metadata: counts against the tensors present, before any work
    case(gguf(**{"llama.block_count": 0xFFFFFFFF}), "llama.block_count must be a positive integer", "4294967295",
         id="gguf-blocks-0xFFFFFFFF"),
    case(gguf(**{"llama.block_count": 3}), "llama.block_count is 3 but the weights hold 2 layers", id="gguf-blocks-3"),
    case(gguf(**{"llama.block_count": 0}), "llama.block_count must be a positive integer", id="gguf-blocks-0"),
    case(gguf(**{"llama.attention.head_count": 0}), "llama.attention.head_count must be a positive integer",
         id="gguf-heads-0"),
    case(gguf(**{"llama.attention.head_count": 3}),
         "llama.embedding_length=32 is not a multiple of llama.attention.head_count=3", id="gguf-heads-3"),
    case(gguf(**{"llama.attention.head_count_kv": 0}), "llama.attention.head_count_kv must be a positive integer",
         id="gguf-kv-heads-0"),
    case(gguf(**{"llama.embedding_length": None}), "GGUF metadata llama.embedding_length is missing",
         id="gguf-no-width"),
    case(gguf(**{"llama.embedding_length": "32"}), "llama.embedding_length must be a positive integer", "'32'",
         id="gguf-width-string"),
    case(gguf(**{"llama.feed_forward_length": 65}),
         "gate_proj.weight has shape (64, 32), the GGUF metadata implies (65, 32)", id="gguf-shape-mismatch"),
    case(gguf(**{"llama.attention.layer_norm_rms_epsilon": "x"}),
         "llama.attention.layer_norm_rms_epsilon must be a finite", id="gguf-eps-string"),
    case(gguf(**{"tokenizer.ggml.bos_token_id": 100000}), "tokenizer.ggml.bos_token_id=100000 is not a token id",
         id="gguf-bos-outside-vocab"),
]


@pytest.mark.parametrize("build, parts", HOSTILE)
def test_hostile_file_is_one_line_naming_file_and_key(pristine, tmp_path, build, parts):
    path, load, _ = build(pristine, tmp_path)
    one_line(load, str(path), *parts)


DRIVER = """
import contextlib, io, json, signal, sys
import generate

def too_slow(*_):
    raise TimeoutError("more than 10 s")

signal.signal(signal.SIGALRM, too_slow)
results = []
for args in json.loads(sys.stdin.read()):
    err = io.StringIO()
    signal.alarm(10)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            generate.main(args)
        results.append([0, err.getvalue()])
    except SystemExit as e:  # sys.exit("error: ...") carries its message; the parser printed its own
        results.append([1 if isinstance(e.code, str) else e.code, e.code + "\\n" if isinstance(e.code, str)
                        else err.getvalue()])
    except BaseException as e:  # a traceback for the user: MemoryError, TimeoutError, anything
        results.append(["crash", f"{type(e).__name__}: {e}"])
    finally:
        signal.alarm(0)
print(json.dumps(results))
"""


def test_every_hostile_file_fails_generate_in_one_line_under_a_memory_cap(pristine, tmp_path):
    cases = []
    for i, p in enumerate(HOSTILE):
        build, parts = p.values
        path, _, args = build(pristine, tmp_path / str(i))
        cases.append((p.id, str(path), parts, [*args, "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"]))
    r = run_capped(["-c", DRIVER], stdin=json.dumps([c[-1] for c in cases]).encode(), timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    bad = [(name, code, err) for (name, path, parts, _), (code, err) in zip(cases, json.loads(r.stdout))
           if code in (0, "crash") or err.count("\n") != 1 or not err.startswith("error: ")
           or not all(p in err for p in (path, *parts))]
    assert not bad, "\n".join(map(str, bad))


def test_config_is_checked_against_the_headers_before_any_tensor_is_read(pristine, tmp_path, monkeypatch):
    path = copy(pristine, tmp_path, "model")
    edit_json(path / "config.json", vocab_size=100)
    monkeypatch.setattr(M.io, "read_safetensors", lambda *a, **k: pytest.fail("tensor data read before the check"))
    one_line(lambda: M.load_pretrained(path), "model.embed_tokens.weight has shape (128, 32)", "(100, 32)")


def test_nothing_is_allocated_before_the_adapter_check(pristine, tmp_path, monkeypatch):
    """peft.apply (which allocates) never runs for an adapter whose config doesn't fit its file."""
    path = copy(pristine, tmp_path, "lora")
    edit_json(path / "adapter_config.json", r=10000000)
    monkeypatch.setattr(peft, "apply", lambda *a: pytest.fail("apply ran before the check"))
    one_line(lambda: peft.load_adapter(M.load_pretrained(pristine["model"]), path), "(10000000, 32)")


def test_unavailable_device_is_a_device_error(pristine):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    msg = one_line(lambda: M.load_pretrained(pristine["model"], device="cuda:7"), "device 'cuda:7' is not available")
    assert "corrupt" not in msg


# ---- generate.py flags (in-process: the parser's exit) -------------------------------------------------------------

@pytest.mark.parametrize("flags, part", [
    (["--raw", "--prompt", ""], "--raw --prompt '': an empty prompt"),
    (["--top-p", "0"], "--top-p 0.0: expected a number in (0, 1]"),
    (["--top-p", "nan"], "--top-p nan"),
    (["--top-p", "1.5"], "--top-p 1.5"),
    (["--temperature", "nan"], "--temperature nan: expected a finite number >= 0"),
    (["--temperature", "-1"], "--temperature -1.0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: expected an integer >= 1"),
    (["--max-new-tokens", "-1"], "--max-new-tokens -1"),
    (["--top-k", "-1"], "--top-k -1: expected an integer >= 0"),
    (["--top-k", "x"], "argument --top-k: invalid int value: 'x'"),
    (["--seed", "-1"], "--seed -1"),
])
def test_bad_generate_flag_is_one_line_exit_2(flags, part, capsys):
    with pytest.raises(SystemExit) as e:
        generate.parse_args(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and part in err, err


def test_generate_unavailable_device(pristine):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) as e:
        generate.main(["--model", str(pristine["model"]), "--prompt", "hi", "--device", "cuda:7"])
    assert str(e.value.code).startswith("error: device 'cuda:7' is not available")


# ---- the real CLI, each in a fresh process under the cap ----------------------------------------------------------

def run_capped(args, stdin: bytes = b"", timeout: int = 10) -> subprocess.CompletedProcess:
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, input=stdin, capture_output=True, timeout=timeout,
                          preexec_fn=cap, env=env)


@pytest.mark.parametrize("name", ["layers-100000", "lora-r-1e7", "gguf-blocks-0xFFFFFFFF"])
def test_cli_fails_fast_in_one_line(pristine, tmp_path, name):
    build, parts = next(p.values for p in HOSTILE if p.id == name)
    path, _, args = build(pristine, tmp_path)
    r = run_capped(["generate.py", *args, "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"])
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1 and err.startswith("error: ") and str(path) in err, err
    assert all(p in err for p in parts), err


def test_cli_bad_flag_exits_2_in_one_line():
    r = run_capped(["generate.py", "--top-p", "0", "--prompt", "hi"])
    assert r.returncode == 2 and r.stderr.decode() == "error: --top-p 0.0: expected a number in (0, 1] (see --help)\n"


def test_chat_survives_a_line_that_is_not_utf8(pristine):
    r = run_capped(["generate.py", "--model", str(pristine["model"]), "--max-new-tokens", "2", "--greedy",
                    "--device", "cpu"], stdin=b"hi\n\xff\xfe oops\nagain\n")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "error: that line is not UTF-8 text (byte 0xff at position 0)" in err
    assert err.count(" tokens, ") == 2 and "Traceback" not in err  # the turns before and after were answered
