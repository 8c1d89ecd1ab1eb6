"""Bad checkpoints and inputs: each is a one-line error naming the file or tensor, never a traceback."""
import json
import subprocess
import sys

import pytest
import torch

from model import CheckpointError, ModelConfig, Transformer, load_pretrained, save_pretrained
from model.gguf import smollm2_gguf
from tests.reference import tiny_hf_config


@pytest.fixture
def tiny_dir(tmp_path):
    model = Transformer(ModelConfig.from_hf(tiny_hf_config("llama"))).init_weights(seed=0)
    return save_pretrained(model, tmp_path / "tiny"), model


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_round_trip_is_exact(tiny_dir):
    path, model = tiny_dir
    again = load_pretrained(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path)
    assert "no config.json" in _one_line(e)


def test_unsupported_model_type(tiny_dir):
    path, _ = tiny_dir
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    msg = _one_line(e)
    assert "'gpt2'" in msg and "llama, mistral, qwen2, qwen3" in msg and "config.json" in msg


def test_missing_shard(tmp_path):
    model = Transformer(ModelConfig.from_hf(tiny_hf_config("llama"))).init_weights(seed=0)
    path = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (path / victim).unlink()
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    assert victim in _one_line(e) and "missing" in str(e.value)


def test_shape_mismatch_names_tensor(tiny_dir):
    path, _ = tiny_dir
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    assert "model.layers.0.mlp.gate_proj.weight" in _one_line(e) and "(96, 64)" in str(e.value)


def test_missing_and_unexpected_tensors(tiny_dir):
    from safetensors.torch import load_file, save_file
    path, _ = tiny_dir
    sd = load_file(path / "model.safetensors")
    sd["model.layers.0.self_attn.extra.weight"] = sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    assert "model.layers.1.mlp.up_proj.weight" in _one_line(e)
    del sd["model.layers.0.self_attn.extra.weight"]
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    sd["bogus.weight"] = torch.zeros(1)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    assert "unexpected" in _one_line(e) and "bogus.weight" in str(e.value)


def test_corrupt_safetensors_header(tiny_dir):
    path, _ = tiny_dir
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:16] = b"{garbage"
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    assert "model.safetensors" in _one_line(e) and "corrupt" in str(e.value)


def test_bin_only_dir_is_refused_then_converted(tiny_dir):
    path, model = tiny_dir
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    (path / "model.safetensors").unlink()
    torch.save(sd, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    assert "pytorch_model.bin" in _one_line(e) and "--convert-bin" in str(e.value)
    loaded = load_pretrained(path, allow_bin=True)  # torch.load(weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sd.values()))
    r = subprocess.run([sys.executable, "-m", "model.io", "--convert-bin", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (path / "model.safetensors").is_file()


def test_truncated_gguf(tmp_path):
    data = smollm2_gguf().read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError) as e:
        load_pretrained(bad)
    assert "cut.gguf" in _one_line(e)


def test_cli_error_is_one_line_exit_nonzero(tmp_path):
    r = subprocess.run([sys.executable, "generate.py", "--model", str(tmp_path), "--prompt", "hi"],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "no config.json" in r.stderr and "Traceback" not in r.stderr


def test_overwriting_save_keeps_other_files(tiny_dir):
    path, model = tiny_dir
    (path / "tokenizer.json").write_text("{}")
    save_pretrained(model, path)
    assert (path / "tokenizer.json").read_text() == "{}" and (path / "model.safetensors").is_file()
