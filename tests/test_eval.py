"""eval.py against lm-eval-harness (HF backend, fp32, a local task YAML on the same JSONL, --log_samples): the
same prompts, per-choice log-likelihoods <= 1e-4, identical acc and acc_norm; the packed batches against plain
one-sequence-per-choice forwards; bad task files as one-line file:line errors."""
import json

import pytest
import torch

import eval as E
import model as M
import peft
from tests import tiny
from tests.reference import run_lm_eval

pytestmark = pytest.mark.usefixtures("one_thread")

# varied choice lengths (acc_norm differs from acc), a multi-token and a non-ASCII choice (acc_norm counts
# characters, lm-eval's acc_bytes bytes), a 2-choice and a 5-choice question
QUESTIONS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Berlin", "Madrid", "Rome"], "answer": 0},
    {"question": "Which drink is hot?", "choices": ["iced lemonade with mint", "tea", "café"], "answer": 2},
    {"question": "Is ice cold?", "choices": ["yes", "no"], "answer": 0},
    {"question": "2 + 2 = ?", "choices": ["3", "4", "5", "22", "four point zero"], "answer": 1},
    {"question": "Which is a colour?", "choices": ["blue", "table", "running quickly"], "answer": 0},
    {"question": "Say hi.", "choices": ["hi", "goodbye and see you later"], "answer": 0},
]
DEV = [{"question": "What is the capital of Spain?", "choices": ["Lisbon", "Madrid"], "answer": 1},
       {"question": "Which animal barks?", "choices": ["Cat", "Dog", "Cow"], "answer": 1},
       {"question": "Unused third shot?", "choices": ["a", "b"], "answer": 0}]


def task_files(d):
    tiny.write_jsonl(d / "qs.dev.jsonl", DEV)
    return tiny.write_jsonl(d / "qs.jsonl", QUESTIONS)


@pytest.fixture(scope="module")
def lm_eval_tiny(tmp_path_factory):
    """A tiny random llama saved by our model, its char tokenizer, the task 0- and 2-shot through lm-eval."""
    d = tmp_path_factory.mktemp("eval")
    mdir, task = tiny.make_model(d / "m", seed=3), task_files(d)
    ref = run_lm_eval(d, str(mdir), {"qs0": (task, 0), "qs2": (task, 2)})
    return mdir, task, ref


def assert_same_as_lm_eval(res: dict, name: str, ref: dict, task: dict):
    assert [E.context(r, task["shots"]) for r in task["records"]] == ref["contexts"]  # prompt format
    ours, theirs = res[f"{name}/logliks"], ref["logliks"]
    assert [len(x) for x in ours] == [len(x) for x in theirs]
    err = max(abs(a - b) for o, t in zip(ours, theirs) for a, b in zip(o, t))
    assert err <= 1e-4, err
    assert res[f"{name}/acc"] == ref["acc"] and res[f"{name}/acc_norm"] == ref["acc_norm"]


@pytest.mark.parametrize("shots", [0, 2])
def test_cli_matches_lm_eval(lm_eval_tiny, tmp_path, shots):
    mdir, task, ref = lm_eval_tiny
    out = tmp_path / "res.json"
    res = E.main(["--model", str(mdir), "--tasks", str(task), "--shots", str(shots), "--out", str(out)])
    assert_same_as_lm_eval(res, "qs", ref[f"qs{shots}"], E.load_tasks(task, shots)["qs"])
    saved = json.loads(out.read_text())
    assert saved["qs/acc"] == res["qs/acc"] and saved["shots"] == shots and saved["qs/logliks"] == res["qs/logliks"]
    assert res["overall/acc"] == res["qs/acc"]
    assert torch.is_grad_enabled()  # eval.main leaves the caller's autograd state alone (train.py calls it too)


def plain_logliks(model, tok, ctx: str, choices: list[str]) -> list[float]:
    """One full forward per (context, choice), no packing, no cache, no batching: the definition."""
    out = []
    for c in choices:
        ctx_ids = tok.encode(ctx)
        cont = tok.encode(ctx + " " + c)[len(ctx_ids):]
        logp = torch.log_softmax(model(torch.tensor([ctx_ids + cont[:-1]]))[0].float(), -1)  # (T, V)
        out.append(float(logp[len(ctx_ids) - 1:].gather(1, torch.tensor(cont)[:, None]).sum()))
    return out


@pytest.mark.parametrize("over", [{}, {"model_type": "mistral", "sliding_window": 40}])
def test_packed_batches_equal_plain_forwards(tmp_path, over):
    """Several batches (batch_tokens small), a shared k-shot prefix in the cache; with a sliding window shorter
    than the packed rows (Mistral, 40) each choice gets its own row."""
    mdir, task = tiny.make_model(tmp_path / "m", seed=4, **over), task_files(tmp_path)
    model, tok = M.load_pretrained(mdir), M.load_tokenizer(mdir)
    t = E.load_tasks(task, 2)["qs"]
    qs = [(E.context(r, t["shots"]), r["choices"]) for r in t["records"]]
    with torch.no_grad():
        want = [plain_logliks(model, tok, *q) for q in qs]
    for batch_tokens in (64, 4096):
        got = E.loglikelihoods(model, tok, qs, batch_tokens=batch_tokens)
        err = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))
        assert err <= 1e-4, (batch_tokens, err)


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix", "llama_adapter", "lora"])
def test_adapters_equal_plain_forwards(tmp_path, method):
    """eval.py's cache of the shared prefix and its tree mask with an adapter on top: prompt/P-tuning put their
    virtual tokens into that cache, prefix tuning adds its own keys, LLaMA-Adapter its gated prompts; each must
    score what one plain forward per choice through the same adapted model scores."""
    mdir, task = tiny.make_model(tmp_path / "m", seed=5), task_files(tmp_path)
    tok = M.load_tokenizer(mdir)
    cfg = peft.method_config(method, {"llama_adapter": {"adapter_layers": 2}}, str(mdir))  # the tiny model's 2
    model = peft.apply(M.load_pretrained(mdir), cfg)
    torch.manual_seed(7)  # LoRA's B and LLaMA-Adapter's gate start at zero: the adapter must change the scores
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1 if p.requires_grad else 0)
    t = E.load_tasks(task, 2)["qs"]
    qs = [(E.context(r, t["shots"]), r["choices"]) for r in t["records"]]
    with torch.no_grad():
        want = [plain_logliks(model, tok, *q) for q in qs]
    got = E.loglikelihoods(model, tok, qs, batch_tokens=64)
    err = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))
    assert err <= 1e-4, err
    with peft.disabled(model), torch.no_grad():
        plain = plain_logliks(model, tok, *qs[0])
    assert max(abs(a - b) for a, b in zip(got[0], plain)) > 1e-3  # the adapter was in the scores


def test_pack_rows():
    rows = E.pack([5, 6, 7], [[8], [9, 10, 11]], window=None)
    assert rows == [{"ids": [5, 6, 7, 9, 10], "pos": [0, 1, 2, 3, 4], "seg": [-1, -1, -1, 1, 1],
                     "where": [2, 2, 3, 4], "tgt": [8, 9, 10, 11], "owner": [0, 1, 1, 1]}]
    assert len(E.pack([5, 6, 7], [[8], [9, 10, 11]], window=4)) == 2  # 5 packed tokens > window: a row each


@pytest.mark.parametrize("line, msg", [
    ('{"question": "q", "choices": ["a"], "answer": 0}', "1 choice(s); a multiple-choice question needs at least 2"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "answer 2 is not a choice index 0..1"),
    ('{"question": "q", "choices": ["a", "b"], "answer": true}', "answer True is not a choice index 0..1"),
    ('{"question": "q", "choices": ["a", "b"]}', "missing key \"answer\""),
    ('{"choices": ["a", "b"], "answer": 0}', "missing key \"question\""),
    ('{"question": "q", "answer": 0}', "missing key \"choices\""),
    ('{"question": "q", "choices": "ab", "answer": 0}', "\"choices\" must be a list of non-empty strings"),
    ('{"question": "q", "choices": ["a", ""], "answer": 0}', "\"choices\" must be a list of non-empty strings"),
    ('[1, 2]', "expected a JSON object"),
    ('{"question": ', "not JSON"),
])
def test_bad_task_line_is_one_line_error(tmp_path, capsys, line, msg):
    good = json.dumps(QUESTIONS[0])
    f = tmp_path / "bad.jsonl"
    f.write_text(good + "\n\n" + line + "\n")  # the bad record is on line 3 (after a blank line)
    with pytest.raises(SystemExit) as e:
        E.main(["--model", "unused", "--tasks", str(f)])  # the tasks are checked before the model loads
    err = str(e.value.code)
    assert err.startswith(f"error: {f}:3: ") and msg in err and "\n" not in err, err


def test_bad_task_files(tmp_path):
    f = tiny.write_jsonl(tmp_path / "t.jsonl", QUESTIONS)
    with pytest.raises(E.TaskError, match="needs a dev split"):
        E.load_tasks(f, 1)
    tiny.write_jsonl(tmp_path / "t.dev.jsonl", DEV[:1])
    with pytest.raises(E.TaskError, match="1 records, fewer than --shots 2"):
        E.load_tasks(f, 2)
    with pytest.raises(E.TaskError, match="no such task file"):
        E.load_tasks(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(E.TaskError, match="no records"):
        E.load_tasks(str(tmp_path / "empty.jsonl"))
    with pytest.raises(SystemExit, match="--shots -1: expected >= 0"):
        E.main(["--tasks", str(f), "--shots", "-1"])


@pytest.mark.slow
def test_smollm2_matches_lm_eval(tmp_path):
    """The real model, 2-shot, on the first 6 questions of the shipped task."""
    from model.gguf import default_model
    records = [json.loads(x) for x in open("data/eval/nano_facts.jsonl").read().splitlines()[:6]]
    task = tiny.write_jsonl(tmp_path / "nf.jsonl", records)
    (tmp_path / "nf.dev.jsonl").write_text(open("data/eval/nano_facts.dev.jsonl").read())
    ref = run_lm_eval(tmp_path, str(default_model()), {"nf": (task, 2)})["nf"]
    res = E.main(["--tasks", str(task), "--shots", "2", "--out", str(tmp_path / "res.json")])
    assert_same_as_lm_eval(res, "nf", ref, E.load_tasks(task, 2)["nf"])


def test_train_eval_tasks(tmp_path):
    """train.py --eval-tasks: after training, the trained model's acc / acc_norm per task in metrics.jsonl and
    report.md, equal to eval.py on the saved adapter; a bad task file stops the run before --out is written."""
    import train
    s = tiny.run_inputs(tmp_path, 8)
    task = task_files(tmp_path)
    common = ["--model", s["model"], "--data", s["data"], "--method", "lora", "--max-steps", "2", "--batch-size",
              "4", "--lr", "1e-2", "--seq-len", "128", "--quiet", "--eval-tasks", str(task), "--eval-shots", "2"]
    out = train.main(common + ["--out", str(tmp_path / "run")])
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    ev = ["--model", s["model"], "--tasks", str(task), "--shots", "2", "--out", str(tmp_path / "res.json")]
    want, base = E.main(ev + ["--adapter", str(out / "adapter")]), E.main(ev)
    assert rec["step"] == 2 and rec["qs/acc"] == want["qs/acc"] and rec["qs/acc_norm"] == want["qs/acc_norm"]
    assert rec["overall/acc"] == want["overall/acc"]
    assert want["qs/logliks"] != base["qs/logliks"]  # the adapter changed the scores: the trained model was scored
    assert "| qs/acc |" in (out / "report.md").read_text()
    bad = tiny.write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a"], "answer": 0}])
    with pytest.raises(SystemExit, match=f"error: {bad}:1: 1 choice"):
        train.main(common[:-4] + ["--eval-tasks", str(bad), "--out", str(tmp_path / "run2")])
    assert not (tmp_path / "run2").exists()
