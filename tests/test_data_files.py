"""Bring-your-own-data files: CSV/TSV/Parquet/Arrow/gzip/BOM/single-object/directory inputs give the JSONL's
examples; LLaMA-Factory dataset_info.json and --columns; every silently-ignored case is a warning (an error with
--strict-data); preference data read into data.Preference and refused by SFT; --max-samples; mixing proportions
and a bit-identical resume with --mix interleave."""
import gzip
import json

import pytest

import data
import model as M
import train
from tests.test_train import KILL_AFTER_SAVE_5, final_weights, losses
from tests.tiny import chat_records, make_model, make_tokenizer, run_train, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return M.load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


def examples(tok, paths, **kw):
    exs, st = data.load_examples(tok, [str(p) for p in paths], 512, opts=data.ReadOptions(verbose=False, **kw))
    return [(e.ids.tolist(), e.train.tolist()) for e in exs], st


# --- file formats: the same examples as the JSONL ------------------------------------------------------------------
ALPACA = [{"instruction": f"q{i}, \"quoted\"\nline", "input": "x" * (i % 2), "output": f"a{i}"} for i in range(5)]
SHAREGPT = [r for r in chat_records(9) if "conversations" in r]


def csv_text(recs, sep=","):
    import csv
    import io
    keys = sorted({k for r in recs for k in r})
    buf = io.StringIO()
    w = csv.DictWriter(buf, keys, delimiter=sep)
    w.writeheader()
    for r in recs:
        w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return buf.getvalue()


def test_file_formats_give_the_jsonl_examples(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    for name, recs in (("alpaca", ALPACA), ("sharegpt", SHAREGPT)):
        d = tmp_path / name
        d.mkdir()
        want, _ = examples(tok, [write_jsonl(d / "a.jsonl", recs)])
        assert len(want) == len(recs)
        (d / "a.csv").write_text(csv_text(recs))
        (d / "a.tsv").write_text(csv_text(recs, "\t"))
        (d / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (d / "a.jsonl").read_bytes())
        (d / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(recs, indent=2).encode())
        with gzip.open(d / "a.jsonl.gz", "wb") as f:
            f.write((d / "a.jsonl").read_bytes())
        table = pa.Table.from_pylist(recs)
        pq.write_table(table, d / "a.parquet")
        with pa.ipc.new_stream(d / "a.arrow", table.schema) as w:  # HF datasets' cache files: the stream format
            w.write_table(table)
        for f in ("a.csv", "a.tsv", "bom.jsonl", "bom.json", "a.jsonl.gz", "a.parquet", "a.arrow"):
            got, st = examples(tok, [d / f])
            assert got == want, (name, f)
            assert st["warnings"] == [], (name, f, st["warnings"])
        sub = d / "dir"
        sub.mkdir()
        write_jsonl(sub / "1.jsonl", recs[:2])
        (sub / "2.csv").write_text(csv_text(recs[2:]))
        assert examples(tok, [sub])[0] == want
    # one pretty-printed object (neither an array nor JSONL)
    (tmp_path / "one.json").write_text(json.dumps(ALPACA[0], indent=2))
    assert examples(tok, [tmp_path / "one.json"])[0] == examples(tok, [write_jsonl(tmp_path / "o.jsonl",
                                                                                    ALPACA[:1])])[0]


def test_text_split_modes(tok, tmp_path):
    f = tmp_path / "lines.txt"
    f.write_text("first doc\nsecond doc\nthird doc\n")
    recs = {s: [p for _, _, p in data.read_records([f], opts=data.ReadOptions(text_split=s, verbose=False))]
            for s in ("lines", "blank", "file")}
    assert recs["lines"] == ["first doc", "second doc", "third doc"]
    assert recs["blank"] == recs["file"] == ["first doc\nsecond doc\nthird doc"]
    st = {}
    list(data.read_records([f], stats=st, opts=data.ReadOptions(verbose=False)))
    assert "no blank line between documents" in st["warnings"][0] and "--text-split lines" in st["warnings"][0]
    exs, _ = data.load_examples(tok, [f], 64, opts=data.ReadOptions(text_split="lines", verbose=False))
    assert [tok.decode(e.ids.tolist(), skip_special_tokens=False) for e in exs] == [
        "first doc<|im_end|>", "second doc<|im_end|>", "third doc<|im_end|>"]  # each its own EOS


def test_pyarrow_missing_is_one_line(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda n, *a, **k: (_ for _ in ()).throw(ImportError(n))
                        if n.startswith("pyarrow") else real(n, *a, **k))
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    with pytest.raises(data.DataError, match=r"a\.parquet: reading \.parquet files needs pyarrow \(pip install"):
        list(data.read_records([tmp_path / "a.parquet"]))


# --- never silent: warnings with counts, --strict-data, --skip-bad-records by line ------------------------------
MSG = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
SILENT = {  # record -> the warning it must give
    "images": ({"messages": MSG, "images": ["a.png"]}, "field 'images' ignored (images, video and audio are not"),
    "unknown_field": ({"instruction": "q", "output": "a", "id": 7}, "field 'id' ignored"),
    "message_field": ({"messages": [{**MSG[0], "foo": 1}, MSG[1]]}, "field 'messages[].foo' ignored"),
    "developer": ({"messages": [{"role": "developer", "content": "be nice"}, *MSG]},
                  "role 'developer' read as 'system'"),
    "placeholder": ({"instruction": "Who are you?", "output": "I am {{name}}, made by {{author}}."},
                    "placeholder-like '{{name}}' trained literally"),
    "image_tag": ({"messages": [{"role": "user", "content": "<image>What is this?"}, MSG[1]]},
                  "'<image>' tag trained as text"),
    "image_part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                                            {"type": "text", "text": "What?"}]}, MSG[1]]},
                   "content part of type 'image_url' dropped"),
    "system_twice": ({"system": "A", "conversations": [{"from": "system", "value": "B"},
                                                       {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
                     "top-level 'system' ignored"),
    "train_user": ({"messages": [{**MSG[0], "train": True}, MSG[1]]}, "'train' on a user message ignored"),
}


@pytest.mark.parametrize("case", sorted(SILENT))
def test_silent_cases_are_warnings_and_strict_errors(case, tmp_path, capsys):
    rec, warning = SILENT[case]
    f = write_jsonl(tmp_path / "d.jsonl", [rec, {"messages": MSG}, rec])
    st = {}
    assert len(list(data.read_records([f], stats=st))) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == st["warnings"] and len(lines) == 1, lines
    assert lines[0].startswith(f"warning: {f}: {warning}") and lines[0].endswith("in 2 records (first: 1)")
    with pytest.raises(data.DataError) as e:
        list(data.read_records([f], opts=data.ReadOptions(strict=True)))
    assert str(e.value).startswith(f"{f}:1: {warning}") and "--strict-data" in str(e.value)


ERRORS = {
    "fractional_weight": ({"messages": [MSG[0], {**MSG[1], "weight": 0.5}]}, "messages[1]: field 'weight' must be 0"),
    "tools_not_json": ({"tools": "[{oops", "messages": MSG}, "field 'tools' is a string but not valid JSON"),
    "bad_call": ({"messages": [MSG[0], {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]},
                 "tool call 0 must be an object with a string 'name'"),
    "kto_label": ({"prompt": "q", "completion": "bad answer", "label": False}, "preference data"),
    "pairs": ({"prompt": "q", "chosen": "good", "rejected": "bad"}, "train it with --stage dpo (pairs) or --stage kto"),
    "part_without_type": ({"messages": [{"role": "user", "content": [{"text": "x"}]}, MSG[1]]},
                          "messages[0]: content[0] must be a content part"),
    "segments_label": ({"segments": [{"label": "yes", "text": "x"}]}, "segments[0] must be an object with a boolean"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_shapes_are_one_line_errors(tok, case, tmp_path):
    rec, what = ERRORS[case]
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": MSG}, rec])
    with pytest.raises(data.DataError) as e:
        data.load_examples(tok, [f], 256)
    assert str(e.value).startswith(f"{f}:2: ") and what in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_skip_bad_records_says_which(tok, tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    # a bad FIRST line: still JSONL (not taken for one pretty-printed object, which would drop the rest)
    f.write_text("\n".join(["{oops", json.dumps({"messages": MSG}), json.dumps({"text": 1}),
                            json.dumps({"messages": MSG})]) + "\n")
    exs, st = data.load_examples(tok, [f], 64, skip_bad=True)
    err = capsys.readouterr().err.splitlines()
    assert len(exs) == 2 and st["bad"] == 2
    assert err == [f"warning: skipped {f}:1: invalid JSON (Expecting property name enclosed in double quotes at "
                   "column 2)", f"warning: skipped {f}:3: field 'text' must be a string, got int"]


# --- preference data: read for the preference stage, refused by SFT -----------------------------------------------
def test_preference_shapes_read_into_one_structure(tmp_path):
    u, a, b = {"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}, \
        {"role": "assistant", "content": "bad"}
    recs = [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},                                    # TRL standard
        {"prompt": [u], "chosen": [a], "rejected": [b]},                                         # TRL conversational
        {"chosen": [u, a], "rejected": [u, b]},                                                  # TRL implicit prompt
        {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
         "rejected": {"from": "gpt", "value": "bad"}},                                           # LF dpo_en_demo
        {"instruction": "q", "chosen": "good", "rejected": "bad"},                               # LF alpaca ranking
        {"prompt": [u], "completion": [a], "label": True},                                       # TRL KTO
        {"messages": [u, b], "kto_tag": False},                                                  # LF KTO
    ]
    got = [p for _, p in data.read_preferences([write_jsonl(tmp_path / "p.jsonl", recs)])]
    assert got[0] == data.Preference("q", "good", "bad")
    for p in got[1:5]:
        assert list(p.prompt) == [u] and p.chosen == [a] and p.rejected == [b] and p.label is None
    assert list(got[5].prompt) == [u] and got[5].chosen == [a] and got[5].label is True
    assert list(got[6].prompt) == [u] and got[6].chosen == [b] and got[6].label is False
    with pytest.raises(data.DataError, match=r"p2.jsonl:1: not a preference record"):
        data.read_preferences([write_jsonl(tmp_path / "p2.jsonl", [{"messages": [u, a]}])])
    with pytest.raises(data.DataError, match=r"p3.jsonl:1: missing field 'rejected'"):
        data.read_preferences([write_jsonl(tmp_path / "p3.jsonl", [{"prompt": "q", "chosen": "x"}])])


# --- LLaMA-Factory dataset_info.json, --columns, --max-samples, mixing -------------------------------------------
def cfg_for(argv):
    return train.parse_args(["--data", "x", *argv])


def test_dataset_info_renamed_columns_and_tags_train_the_canonical_examples(tok, tmp_path):
    """Modelled on LLaMA-Factory's documented dataset_info.json examples: an alpaca file with its own column
    names, an OpenAI-style file read as sharegpt with role/content tags, a directory, num_samples."""
    canon = tmp_path / "canon"
    canon.mkdir()
    write_jsonl(canon / "alpaca.jsonl", ALPACA)
    msgs = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"q{i}"},
                               {"from": "gpt", "value": f"a{i}"}]} for i in range(4)]
    write_jsonl(canon / "chat.jsonl", msgs)
    d = tmp_path / "lf"
    d.mkdir()
    write_jsonl(d / "qa.jsonl", [{"question": r["instruction"], "context": r["input"], "answer": r["output"]}
                                 for r in ALPACA])
    (d / "chats").mkdir()
    write_jsonl(d / "chats" / "part.jsonl", [{"dialog": [{"speaker": {"human": "customer", "gpt": "agent",
                                                                        "system": "rules"}[t["from"]],
                                                           "text": t["value"]} for t in m["conversations"]]}
                                             for m in msgs])
    (d / "dataset_info.json").write_text(json.dumps({
        "qa": {"file_name": "qa.jsonl", "columns": {"prompt": "question", "query": "context", "response": "answer"}},
        "chats": {"file_name": "chats", "formatting": "sharegpt", "columns": {"messages": "dialog"},
                  "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer",
                           "assistant_tag": "agent", "system_tag": "rules"}},
        "few": {"file_name": "qa.jsonl", "num_samples": 3, "columns": {"prompt": "question", "response": "answer"}},
        "pairs": {"file_name": "qa.jsonl", "ranking": True},
        "hub": {"hf_hub_url": "someone/data"}}))
    for name, canon_file in (("qa", "alpaca.jsonl"), ("chats", "chat.jsonl")):
        cfg = cfg_for(["--dataset-dir", str(d)])
        cfg.data = name
        got, _, st = data.load_splits(tok, cfg, verbose=False)
        want, _ = data.load_examples(tok, [canon / canon_file], cfg.seq_len)
        assert [e.ids.tolist() for e in got] == [e.ids.tolist() for e in want] and len(got) == len(want), name
        assert [e.train.tolist() for e in got] == [e.train.tolist() for e in want]
        assert st["warnings"] == []
    cfg.data = "few"
    assert len(data.load_splits(tok, cfg, verbose=False)[0]) == 3
    for name, what in (("pairs", "pairs: ranking: preference data"), ("hub", "hub: hf_hub_url is not supported"),
                       ("nope", "no dataset 'nope' (has: qa, chats, few, pairs, hub)")):
        cfg.data = name
        with pytest.raises(data.DataError, match=what.replace("(", r"\(").replace(")", r"\)")):
            data.load_splits(tok, cfg, verbose=False)


def test_columns_and_max_samples(tok, tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"question": r["instruction"], "answer": r["output"]} for r in ALPACA])
    want, _ = examples(tok, [write_jsonl(tmp_path / "c.jsonl", [{**r, "input": ""} for r in ALPACA])])
    cfg = cfg_for(["--columns", "instruction=question,output=answer"])
    cfg.data = str(f)
    got, _, _ = data.load_splits(tok, cfg, verbose=False)
    assert [(e.ids.tolist(), e.train.tolist()) for e in got] == want
    cfg.max_samples = 2
    assert len(data.load_splits(tok, cfg, verbose=False)[0]) == 2


@pytest.mark.parametrize("argv, what", [
    (["--mix", "zip"], "--mix 'zip': expected one of concat, interleave"),
    (["--mix-probs", "0.5,0.5"], "--mix-probs needs --mix interleave"),
    (["--mix", "interleave", "--mix-probs", "0.5,x"], "expected comma-separated numbers"),
    (["--mix", "interleave", "--mix-probs", "1"], "expected 2 numbers >= 0"),
    (["--truncation", "middle"], "--truncation 'middle': expected one of auto"),
    (["--text-split", "words"], "--text-split 'words'"),
    (["--max-samples", "-1"], "--max-samples -1: expected a number >= 0"),
    (["--columns", "instruction"], "--columns 'instruction': expected OUR=THEIRS"),
])
def test_data_flag_checks_before_anything(argv, what, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "a.jsonl,b.jsonl", "--out", str(tmp_path / "out"), *argv])
    assert str(e.value.code).startswith("error: ") and what in str(e.value.code)
    assert not (tmp_path / "out").exists()


def test_interleave_proportions_within_2_percent():
    draws = data.datasets.interleave([20000, 20000, 20000], [0.7, 0.2, 0.1], seed=5)[:10000]
    for s, p in enumerate((0.7, 0.2, 0.1)):
        assert abs(sum(d == s for d, _ in draws) / len(draws) - p) < 0.02
    assert draws == data.datasets.interleave([20000] * 3, [0.7, 0.2, 0.1], seed=5)[:10000]  # a pure function
    small = data.datasets.interleave([50, 1000], [0.5, 0.5], seed=0)
    assert sum(d == 0 for d, _ in small) == 50 and [i for d, i in small if d == 0] == list(range(50))


@pytest.mark.parametrize("stream", [False, True], ids=["eager", "stream"])
def test_resume_with_mixing_is_bit_identical(tmp_path, stream):
    m = str(make_model(tmp_path / "m", seed=1))
    a = write_jsonl(tmp_path / "a.jsonl", chat_records(40, seed=2))
    b = tmp_path / "b.csv"  # two sources of two file formats
    b.write_text(csv_text([r for r in chat_records(30, seed=3) if "instruction" in r]))
    common = ["--model", m, "--data", f"{a},{b}", "--method", "lora", "--lora-r", "4", "--lora-dropout", "0.1",
              "--mix", "interleave", "--mix-probs", "0.6,0.4", "--batch-size", "2", "--seq-len", "128",
              "--lr", "1e-3", "--save-every", "3", "--max-steps", "6", "--seed", "4"] + ["--stream"] * stream
    run_train([*common, "--out", str(tmp_path / "A")])
    r = run_train([*common, "--out", str(tmp_path / "B")], patch=KILL_AFTER_SAVE_5.replace("== 5", "== 3"),
                  check=False)
    assert r.returncode == -9
    run_train([*common, "--out", str(tmp_path / "B"), "--resume"])
    assert losses(tmp_path / "B") == losses(tmp_path / "A") and len(losses(tmp_path / "A")) == 6
    wa, wb = final_weights(tmp_path / "A"), final_weights(tmp_path / "B")
    assert all((wa[k] == wb[k]).all() for k in wa)
    # the mixing settings are part of the trajectory: a resume with other probabilities is refused
    at = common.index("--mix-probs")
    r = run_train([*common[:at], "--mix-probs", "0.5,0.5", *common[at + 2:], "--out", str(tmp_path / "B"),
                   "--resume", "--max-steps", "8"], check=False)
    assert r.returncode != 0 and "mix_probs" in r.stderr


def test_system_flag_in_inspect_and_generate(tmp_path, capsys, monkeypatch):
    import generate
    from data.inspect import main as inspect
    m = make_model(tmp_path / "m")
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": MSG}])
    inspect(["--model", str(m), "--data", str(f), "-n", "1", "--system", "You are Nano."])
    assert "<|im_start|>system\nYou are Nano.<|im_end|>" in capsys.readouterr().out
    seen = []
    monkeypatch.setattr(generate, "generate", lambda model, ids, *a: seen.append(ids) or [])
    generate.main(["--model", str(m), "--prompts", str(f), "--system", "You are Nano.", "--greedy"])
    tok = M.load_tokenizer(m)
    assert tok.decode(seen[0], skip_special_tokens=False) == (
        "<|im_start|>system\nYou are Nano.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_stream_gives_the_eager_examples(tok, tmp_path):
    """One epoch of --stream holds exactly the examples the eager path makes (in a buffer-shuffled order)."""
    from data.stream import Stream
    f = write_jsonl(tmp_path / "d.jsonl", chat_records(30) + [{"text": "some raw text " * 40}])
    cfg = cfg_for(["--stream", "--max-steps", "1", "--seq-len", "64"])
    cfg.data = str(f)
    eager, _ = data.load_examples(tok, [f], 64)
    streamed = list(Stream(tok, cfg, verbose=False).examples(0))
    key = lambda e: (e.ids.tolist(), e.train.tolist())  # noqa: E731
    assert sorted(map(key, streamed)) == sorted(map(key, eager)) and len(eager) > 31
    assert list(map(key, streamed)) != list(map(key, eager))  # shuffled


STREAM_RUN = """
import time
t0 = time.perf_counter()
orig = train.train_step
def step(*a, **k):
    out = orig(*a, **k)
    if not hasattr(step, "done"):
        # VmHWM: this process's own peak (ru_maxrss would include the parent's, which survives the exec)
        hwm = next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM"))
        print("FIRST_STEP", time.perf_counter() - t0, "RSS", hwm)
    step.done = True
    return out
train.train_step = step
"""


def test_stream_memory_and_start_do_not_grow_with_the_file(tmp_path):
    """--stream on a 4 MB and a 100 MB JSONL: the same peak RSS up to the first step (within 20 MB) and the first
    step in < 30 s (bench/bench_stream.py: 10 MB to 1 GB, SmolLM2)."""
    m = str(make_model(tmp_path / "m", seed=1))
    line = json.dumps({"messages": [{"role": "user", "content": "hello " * 5},
                                    {"role": "assistant", "content": "world " * 5}]}) + "\n"
    res = {}
    for mb in (4, 100):
        f = tmp_path / f"{mb}.jsonl"
        with open(f, "w") as out:  # in 1 MB pieces
            for _ in range(mb):
                out.write(line * ((1 << 20) // len(line)))
        r = run_train(["--model", m, "--data", str(f), "--out", str(tmp_path / f"o{mb}"), "--method", "lora",
                       "--stream", "--max-steps", "3", "--batch-size", "2", "--seq-len", "128"],
                      patch=STREAM_RUN)
        _, t, _, rss = next(ln for ln in r.stdout.splitlines() if ln.startswith("FIRST_STEP")).split()
        res[mb] = (float(t), int(rss) / 1024)  # s, MB (peak RSS up to the end of the first step)
    print("stream first step (s), peak RSS (MB):", res)
    assert all(t < 30 for t, _ in res.values()), res
    assert abs(res[100][1] - res[4][1]) < 20, res


def test_csv_cells_label_and_bracketed_prompt(tmp_path):
    """A CSV label cell "True" is a bool; a prompt cell starting with "[" that is not JSON stays a string."""
    f = tmp_path / "k.csv"
    f.write_text('prompt,completion,label\n"[INST] hi",yo,True\n')
    assert data.read_preferences([f]) == [(f"{f}:2", data.Preference("[INST] hi", "yo", None, True))]
    f.write_text('prompt,completion\n"[INST] hi",yo\n"[{""role"": ""user"", ""content"": ""q""}]",'
                 '"[{""role"": ""assistant"", ""content"": ""a""}]"\n')
    (_, k1, p1), (_, k2, p2) = data.read_records([f])
    assert (k1, p1) == ("completion", ("[INST] hi", "yo"))
    assert k2 == "chat" and list(p2) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
