"""The method table: a new PEFT method is one new file plus one entry in peft.MODULES. tests/toy_method.py is
registered here and must train, evaluate, save, reload and merge through train.py's normal path, with its own
flags and TOML table, and nothing else changed."""
import json

import pytest
import torch

import model as M
import peft
import train
from tests import toy_method
from tests.tiny import chat_records, run_inputs, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return run_inputs(tmp_path_factory.mktemp("table"), 16)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(peft, "MODULES", peft.MODULES + (toy_method,))


def argv(s, out, *extra):
    return ["--model", s["model"], "--data", s["data"], "--out", str(out), "--method", "toy_scale",
            "--batch-size", "4", "--seq-len", "256", "--seed", "3", *extra]


def test_unregistered_method_is_unknown(setup, tmp_path):
    with pytest.raises(SystemExit, match="^error: --method 'toy_scale': expected one of full, qlora, lora8, lora, dora, "):
        train.parse_args(argv(setup, tmp_path / "x"))


def test_toy_method_trains_saves_reloads_and_merges_through_train_py(setup, registered):
    d = setup["dir"]
    ev = write_jsonl(d / "eval.jsonl", chat_records(4, seed=5))
    out = d / "toy"
    train.main(argv(setup, out, "--toy-targets", "o_proj,down_proj", "--toy-init", "1.0", "--lr", "1e-2",
                    "--max-steps", "4", "--eval-data", str(ev), "--eval-every", "4", "--eval-samples", "0",
                    "--merge"))
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in recs if "loss" in r]
    assert len(loss) == 4 and loss[-1] < loss[0]
    # its flags reached its config, and the adapter is in its own format with its own tensors only
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "TOY_SCALE" and acfg["targets"] == ["o_proj", "down_proj"]
    assert json.loads((out / "config.json").read_text())["method_config"] == acfg
    from safetensors.torch import load_file
    sd = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert sorted(sd) == sorted(f"base_model.model.model.layers.{i}.{m}.toy_scale" for i in range(2)
                                for m in ("self_attn.o_proj", "mlp.down_proj"))
    # reloaded onto a fresh base, it gives the eval loss train.py measured in memory; merged, the same model
    tok = M.load_tokenizer(setup["model"])
    exs, _ = train.data.load_examples(tok, [ev], 256)
    cfg = train.parse_args(argv(setup, out))
    reloaded = peft.load_adapter(M.load_pretrained(setup["model"]), out / "adapter")
    got = train.evaluate(reloaded, exs, cfg, torch.device("cpu"), tok.pad_id)
    assert abs(got - [r for r in recs if "eval_loss" in r][-1]["eval_loss"]) < 1e-6
    base = train.evaluate(M.load_pretrained(setup["model"]), exs, cfg, torch.device("cpu"), tok.pad_id)
    assert abs(got - base) > 1e-4
    merged = train.evaluate(M.load_pretrained(out / "model"), exs, cfg, torch.device("cpu"), tok.pad_id)
    assert abs(merged - got) < 1e-5


def test_toy_method_toml_table(setup, registered, tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('method = "toy_scale"\n[toy_scale]\ninit = 0.5\ntargets = ["q_proj"]\n')
    cfg = train.parse_args(["--model", setup["model"], "--data", setup["data"], "--config", str(f)])
    pcfg = peft.method_config(cfg.method, cfg.method_args, cfg.model)
    assert isinstance(pcfg, toy_method.ToyScaleConfig) and (pcfg.init, pcfg.targets) == (0.5, ["q_proj"])
    cfg = train.parse_args(["--model", setup["model"], "--data", setup["data"], "--config", str(f),
                            "--toy-init", "2"])  # a flag wins over the file, as for train.py's own keys
    assert peft.method_config(cfg.method, cfg.method_args, cfg.model).init == 2.0
    f.write_text('method = "toy_scale"\n[toy_scale]\nrank = 3\n')
    with pytest.raises(SystemExit, match=r"run.toml: \[toy_scale\]: unknown key 'rank'"):
        train.parse_args(["--model", setup["model"], "--data", setup["data"], "--config", str(f)])
