"""data/: formats, validation errors (file:line), chat-template masking vs transformers, packing, collation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import model as M
from tests.reference import run_reference
from tests.tiny import chat_records, make_model, make_tokenizer, write_jsonl

MULTI_TURN = {"conversations": [
    {"from": "system", "value": "You are Nano."},
    {"from": "human", "value": "Who made you?"}, {"from": "gpt", "value": "The nanotune project."},
    {"from": "human", "value": "And your name?"}, {"from": "gpt", "value": "Nano."}]}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5",
          "history": [["Hi", "Hello!"]]}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return M.load_tokenizer(tok_dir)


def hf_render(tok_dir, workdir) -> tuple[list, list]:
    """transformers' rendering + token ids of each conversation, and the expected trained-token mask built from
    HF's own tokenised prefixes: tokens from len(prefix + generation prompt) to the end of the turn, minus the
    trailing newline after <|im_end|>."""
    convs = [data.normalise(r, "x")[1] for r in (MULTI_TURN, ALPACA)]
    (workdir / "convs.json").write_text(json.dumps(convs))
    run_reference(f"""
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained("{tok_dir}")
        out = []
        for msgs in json.load(open("convs.json")):
            text = tok.apply_chat_template(msgs, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            mask = [0] * len(ids)
            for i, m in enumerate(msgs):
                if m["role"] == "assistant":
                    a = len(tok(tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False)["input_ids"])
                    b = len(tok(tok.apply_chat_template(msgs[:i + 1], tokenize=False),
                                add_special_tokens=False)["input_ids"])
                    assert tok.decode(ids[b - 2:b]) == "<|im_end|>\\n"
                    mask[a:b - 1] = [1] * (b - 1 - a)
            out.append({{"text": text, "ids": ids, "mask": mask}})
        json.dump(out, open("hf.json", "w"))
    """, workdir)
    return convs, json.loads((workdir / "hf.json").read_text())


@pytest.fixture(scope="module")
def hf_masks(tok_dir, tmp_path_factory):
    return hf_render(tok_dir, tmp_path_factory.mktemp("hfref"))


def check_masks(tok, convs, hf, k):
    ex = data.encode_record(tok, "chat", convs[k], seq_len=4096)[0]
    assert tok.apply_chat_template(convs[k]) == hf[k]["text"]
    assert ex.ids.tolist() == hf[k]["ids"]
    assert ex.train.astype(int).tolist() == hf[k]["mask"]
    # the trained runs are exactly the assistant answers, each with its end-of-turn token
    answers = [m["content"] + "<|im_end|>" for m in convs[k] if m["role"] == "assistant"]
    assert tok.decode(ex.ids[ex.train].tolist(), skip_special_tokens=False) == "".join(answers)


@pytest.mark.parametrize("k", [0, 1], ids=["sharegpt_multiturn", "alpaca_history"])
def test_masking_matches_hf_chat_template(tok, hf_masks, k):
    check_masks(tok, *hf_masks, k)


@pytest.mark.slow
def test_masking_matches_hf_with_real_smollm2_tokenizer(tmp_path):
    """Byte-level BPE with merges (offsets), SmolLM2's own template and its default system prompt."""
    from model.gguf import default_model
    convs, hf = hf_render(default_model(), tmp_path)
    tok = M.load_tokenizer(default_model())
    for k in range(len(convs)):
        check_masks(tok, convs, hf, k)


def test_train_on_prompt_and_truncation(tok):
    ex = data.encode_record(tok, "chat", data.normalise(MULTI_TURN, "x")[1], seq_len=4096, train_on_prompt=True)[0]
    assert ex.train.all()
    short = data.encode_record(tok, "chat", data.normalise(MULTI_TURN, "x")[1], seq_len=20)[0]
    assert len(short.ids) == 20 and short.truncated


def test_raw_text_is_chunked_with_eos(tok, tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text("first document line\nsecond line\n\n\nanother document\n")
    exs, st = data.load_examples(tok, [f], seq_len=16)
    assert st["records"] == 2 and len(exs) == 5 and all(e.train.all() for e in exs)
    assert all(len(e.ids) <= 16 for e in exs)

    def joined(chunks):  # consecutive chunks overlap by one token
        return tok.decode(chunks[0].ids.tolist() + [t for c in chunks[1:] for t in c.ids.tolist()[1:]],
                          skip_special_tokens=False)
    assert joined(exs[:3]) == "first document line\nsecond line<|im_end|>"   # 32 tokens -> 3 chunks
    assert joined(exs[3:]) == "another document<|im_end|>"                    # 17 tokens -> 2 chunks


def test_json_array_and_jsonl_agree(tok, tmp_path):
    recs = chat_records(7)
    (tmp_path / "a.json").write_text(json.dumps(recs, indent=2))
    write_jsonl(tmp_path / "a.jsonl", recs)
    a, _ = data.load_examples(tok, [tmp_path / "a.json"], 512)
    b, _ = data.load_examples(tok, [tmp_path / "a.jsonl"], 512)
    assert [e.ids.tolist() for e in a] == [e.ids.tolist() for e in b] and len(a) == 7


# --- malformed data: one line naming file:line, exit code != 0, --out untouched --------------------------------
GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
BAD_CASES = {
    "invalid_json": (GOOD + "\n" + '{"messages": [\n', 2, "invalid JSON"),
    "missing_field": (GOOD + "\n" + json.dumps({"instruction": "x"}) + "\n", 2, "missing field 'output'"),
    "wrong_type": (GOOD + "\n" + json.dumps({"instruction": "x", "output": 5}) + "\n", 2, "must be a string"),
    "empty_conversation": (json.dumps({"conversations": []}) + "\n", 1, "empty conversation"),
    "unknown_role": (GOOD + "\n\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n", 3,
                     "unknown role 'robot'"),
    "not_utf8": (b'{"text": "caf\xe9"}\n', 1, "not UTF-8"),
    "empty_file": ("", 1, "empty file"),
    "array_element": ('[\n  ' + GOOD + ',\n  {"conversations": 3}\n]', 3, "must be a list"),
    "not_an_object": ("[1, 2]\n", 1, "must be a JSON object"),
}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("m"))


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_malformed_record_one_line_error(case, tiny_model_dir, tmp_path):
    import train
    content, line, what = BAD_CASES[case]
    f = tmp_path / ("bad.json" if case in ("array_element", "not_an_object") else "bad.jsonl")
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    out.mkdir()
    (out / ".nanotune-run").touch()  # a directory of an earlier run (nanotune's marker)
    (out / "config.json").write_text("previous run")
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(tiny_model_dir), "--data", str(f), "--out", str(out), "--method", "full"])
    msg = str(e.value.code)
    assert msg.startswith(f"error: {f}:{line}: ") and what in msg and "\n" not in msg, msg
    assert sorted(p.name for p in out.iterdir()) == [".nanotune-run", "config.json"]
    assert (out / "config.json").read_text() == "previous run"


def test_malformed_record_exit_code_no_traceback(tiny_model_dir, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(BAD_CASES["unknown_role"][0])
    r = subprocess.run([sys.executable, "train.py", "--model", str(tiny_model_dir), "--data", str(f),
                        "--out", str(tmp_path / "out"), "--method", "full"], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {f}:3: messages[0]: unknown role 'robot' "
                                             f"(expected one of system, user, assistant, tool, developer)"]
    assert not (tmp_path / "out").exists()


def test_skip_bad_records_counts(tok, tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(b"\n".join([GOOD.encode(), b"{oops", json.dumps({"messages": []}).encode(), b'{"text": 1}',
                              b'{"text": "\xff"}', GOOD.encode()]) + b"\n")
    with pytest.raises(data.DataError):
        data.load_examples(tok, [f], 64)
    exs, st = data.load_examples(tok, [f], 64, skip_bad=True)
    assert len(exs) == 2 and st["bad"] == 4


# --- packing and collation --------------------------------------------------------------------------------------
def test_packed_per_example_losses_equal_unpacked(tok, tiny_model_dir):
    model = M.load_pretrained(tiny_model_dir)
    exs = [data.encode_record(tok, "chat", data.normalise(r, "x")[1], 512)[0] for r in chat_records(6)]
    exs.append(data.Example(exs[0].ids[:40].copy(), exs[0].ids[:40] > 0))  # a fully trained (raw-text-like) one
    rows = data.pack(exs, 400)
    assert len(rows) < len(exs)
    b = data.collate(rows, tok.pad_id)
    with torch.no_grad():
        logits = model(b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"])
    packed = F.cross_entropy(logits[:, :-1].transpose(1, 2), b["labels"][:, 1:], reduction="none")  # (B, T-1)
    got = packed[b["labels"][:, 1:] != -100]
    want = []
    for e in exs:
        u = data.collate([e], tok.pad_id)
        with torch.no_grad():
            lg = model(u["input_ids"])
        ce = F.cross_entropy(lg[0, :-1], u["labels"][0, 1:], reduction="none")
        want.append(ce[u["labels"][0, 1:] != -100])
    want = torch.cat(want)  # packing keeps the order of examples, so target tokens line up
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # position ids restart at 0 for each packed example, and no query sees another example's keys
    assert (b["position_ids"][0][torch.from_numpy(rows[0].seg).diff().nonzero()[:, 0] + 1] == 0).all()


def test_collate_pad_differs_from_eos_and_eos_is_trained(tok):
    assert tok.pad_id != tok.eos_id
    exs = [data.encode_record(tok, "chat", data.normalise(r, "x")[1], 512)[0] for r in chat_records(3)]
    b = data.collate(exs, tok.pad_id)
    lab, ids = b["labels"], b["input_ids"]
    assert b["attention_mask"].shape == ids.shape
    assert ((lab == tok.eos_id).sum(1) >= 1).all()                      # each answer's <|im_end|> is a target
    assert (lab[ids == tok.pad_id] == -100).all() and (ids[b["attention_mask"] == 0] == tok.pad_id).all()
    assert data.count_targets(b) == sum(int(e.train[1:].sum()) for e in exs)


def test_batch_order_is_deterministic_and_buckets_lengths():
    lengths = [(i * 37) % 101 + 5 for i in range(400)]
    a = data.batch_order(lengths, 8, seed=1, epoch=0)
    assert a == data.batch_order(lengths, 8, seed=1, epoch=0) and a != data.batch_order(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 10  # random batches of 8 would span ~80 tokens


def test_inspect_cli(tiny_model_dir, tmp_path, capsys):
    from data.inspect import main
    f = write_jsonl(tmp_path / "d.jsonl", [MULTI_TURN, ALPACA])
    main(["--model", str(tiny_model_dir), "--data", str(f), "-n", "1"])
    out = capsys.readouterr().out
    assert "⟦The nanotune project.<|im_end|>⟧" in out and "⟦Nano.<|im_end|>⟧" in out
    assert "2 records" in out and "p50" in out and "trained:" in out


def test_default_dataset_is_valid_and_heldout_is_unseen(tok):
    from pathlib import Path
    here = Path(__file__).resolve().parent.parent / "data" / "default"
    train_recs = [p for _, _, p in data.read_records([here / "train.jsonl"])]
    held = [p for _, _, p in data.read_records([here / "heldout.jsonl"])]
    assert 100 <= len(train_recs) <= 300 and len(held) >= 5
    seen = {m["content"] for r in train_recs for m in r}
    assert not any(r[0]["content"] in seen for r in held)  # held-out questions never appear in training
    assert sum("Nano" in m["content"] for r in train_recs for m in r) >= 50


def test_default_run_mechanics_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    """The default run's pipeline (`make train`: train.py with data/default/run.toml, then generate.py's before /
    after answers to the held-out questions) on a tiny model taught one reply."""
    import generate
    import train
    here = Path(__file__).resolve().parent.parent / "data" / "default"
    f = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": "Nano."}]}
                                           for q in ("Who are you?", "Name?", "Your name?", "Who is this?")] * 4)
    h = write_jsonl(tmp_path / "h.jsonl", [{"messages": [{"role": "user", "content": "Who are you, really?"},
                                                          {"role": "assistant", "content": "Nano."}]}])
    train.main(["--config", str(here / "run.toml"), "--model", str(tiny_model_dir), "--data", str(f),
                "--eval-data", str(h), "--out", str(tmp_path / "run"), "--epochs", "30", "--lr", "1e-2",
                "--batch-size", "4", "--warmup", "0"])
    capsys.readouterr()
    generate.main(["--adapter", str(tmp_path / "run" / "adapter"), "--prompts", str(h), "--compare-base",
                   "--greedy", "--max-new-tokens", "40"])
    text = capsys.readouterr().out
    assert "before: " in text and "  after:  Nano.\n" in text and "before: Nano.\n" not in text
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
