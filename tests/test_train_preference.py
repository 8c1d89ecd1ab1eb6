"""train.py --stage dpo|kto: preference data (data/pairs.py) rendered and masked right, bad records named, the
reference model free under PEFT (step 1's DPO loss is exactly log 2), and the loss normalised per pair across
micro-batches and ranks (grad accumulation k x b == one batch of k*b; 2 gloo ranks == 1 process)."""
import json
import math

import numpy as np
import pytest
import torch

import data
import model as M
import train
from data.pairs import Labelled, Pair, load_preference
from tests.tiny import make_model, run_train, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["alpha", "beta", "gamma", "delta", "nano", "tune", "cat", "dog", "sun", "moon"]


def pair_records(n: int, seed: int = 0) -> list[dict]:
    """n preference pairs in the TRL and LLaMA-Factory shapes, of uneven lengths; chosen answers are short."""
    g = torch.Generator().manual_seed(seed)

    def sent(k):
        return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g))
    out = []
    for i in range(n):
        q, good, bad = sent(2 + i % 4), sent(1 + i % 3), sent(3 + (2 * i) % 5)
        if i % 3 == 0:
            out.append({"prompt": q, "chosen": good, "rejected": bad})
        elif i % 3 == 1:
            out.append({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
                        "rejected": [{"role": "assistant", "content": bad}]})
        else:
            out.append({"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": good},
                        "rejected": {"from": "gpt", "value": bad}})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    return {"dir": d, "model": str(make_model(d / "m", seed=1)),
            "data": str(write_jsonl(d / "pairs.jsonl", pair_records(16, seed=2)))}


def test_pairs_render_after_the_same_prompt_and_train_only_the_completion(setup):
    tok = M.load_tokenizer(setup["model"])
    recs = [{"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}],
             "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]},
            {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}]
    f = write_jsonl(setup["dir"] / "shapes.jsonl", recs)
    pairs, st = load_preference(tok, [str(f)], "dpo", 512)
    assert len(pairs) == 2 and st["prompt_truncated"] == 0
    for p, (c, r) in zip(pairs, (("yes", "no"), ("good", "bad"))):
        for ex, answer in ((p.chosen, c), (p.rejected, r)):
            # what the chat template makes of prompt + completion, tokenised whole (transformers' rendering is
            # tested for these templates in tests/test_templates.py); trained: the answer + its end-of-turn only
            assert tok.decode(ex.ids[ex.train].tolist(), skip_special_tokens=False) == answer + "<|im_end|>"
        n = data.pairs.n_prompt(p.chosen)
        assert np.array_equal(p.chosen.ids[:n], p.rejected.ids[:n])
    assert "hello" in tok.decode(pairs[0].chosen.ids.tolist())  # the prompt's own assistant turn: kept, untrained
    b = data.collate(pairs, 0)
    assert b["pairs"] == 2 and b["input_ids"].shape[0] == 4 and data.count_targets(b) == 2


@pytest.mark.parametrize("rec, msg", [
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected' \\(a preference pair needs both"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are the same completion"),
    ({"prompt": [{"role": "user", "content": " "}], "chosen": "a", "rejected": "b"},
     "preference record has an empty prompt"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "field 'label' must be true or false, got 'yes'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "--stage dpo needs 'chosen' and 'rejected'; this record is supervised \\(SFT\\) data"),
])
def test_bad_preference_records_are_one_line_errors_naming_file_and_line(setup, rec, msg):
    f = write_jsonl(setup["dir"] / "bad.jsonl", [pair_records(1)[0], rec])
    with pytest.raises(data.DataError, match=f"bad.jsonl:2: {msg}"):
        load_preference(M.load_tokenizer(setup["model"]), [str(f)], "dpo", 512)


def test_a_completion_cut_away_by_seq_len_is_dropped_and_counted(setup):
    tok = M.load_tokenizer(setup["model"])
    f = write_jsonl(setup["dir"] / "long.jsonl", [{"prompt": "x" * 80, "chosen": "a", "rejected": "b"},
                                                  {"prompt": "q", "chosen": "a", "rejected": "b"}])
    pairs, st = load_preference(tok, [str(f)], "dpo", 64)
    assert len(pairs) == 1 and st["prompt_truncated"] == 1


def test_kto_records_and_their_kl_rows(setup):
    tok = M.load_tokenizer(setup["model"])
    f = write_jsonl(setup["dir"] / "kto.jsonl", [{"prompt": "q1", "completion": "good", "label": True},
                                                 {"prompt": [{"role": "user", "content": "q2"}],
                                                  "completion": [{"role": "assistant", "content": "bad"}],
                                                  "label": False}])
    items, _ = load_preference(tok, [str(f)], "kto", 512)
    assert [type(i) for i in items] == [Labelled, Labelled] and [i.desirable for i in items] == [True, False]
    b = data.collate(items, 0)
    assert b["examples"] == 2 and b["desirable"].tolist() == [True, False]
    kl0 = tok.decode(b["input_ids"][2][b["attention_mask"][2].bool()].tolist(), skip_special_tokens=False)
    assert "q1" in kl0 and "bad" in kl0 and "good" not in kl0  # prompt 0 with completion 1
    with pytest.raises(data.DataError, match="--stage kto needs a completion with a bool 'label'"):
        load_preference(tok, [setup["data"]], "kto", 512)


def argv(s, out, *extra):
    return ["--model", s["model"], "--data", s["data"], "--out", str(out), "--stage", "dpo", "--method", "lora",
            "--lr", "1e-2", "--seq-len", "128", "--seed", "3", "--schedule", "constant", *extra]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_trains_with_the_adapter_disabled_as_reference(setup, tmp_path):
    train.main(argv(setup, tmp_path / "a", "--batch-size", "4", "--max-steps", "6"))
    m = [r for r in metrics(tmp_path / "a") if "loss" in r]
    # LoRA's B starts at 0: the policy IS the reference at step 1, every margin is 0 and the loss log 2
    assert abs(m[0]["loss"] - math.log(2)) < 1e-6 and m[0]["rewards/margins"] == 0.0
    assert m[0]["trained_tokens"] == 4  # pairs in the global batch
    assert m[-1]["rewards/margins"] > 0 and m[-1]["loss"] < m[0]["loss"]  # it learns to prefer chosen
    assert (tmp_path / "a" / "adapter" / "adapter_model.safetensors").is_file()


def test_dpo_loss_is_per_pair_across_micro_batches_and_ranks(setup, tmp_path):
    """One batch of 4 pairs == 2 micro-batches of 2 == 2 gloo ranks x 1 x 2 micro-batches, plain or ZeRO-3."""
    runs = {"one": ["--batch-size", "4"], "accum": ["--batch-size", "2", "--grad-accum", "2"]}
    for name, extra in runs.items():
        train.main(argv(setup, tmp_path / name, "--max-steps", "3", "--pref-loss", "ipo", *extra))
    for name, zero in (("ranks", "0"), ("zero3", "3")):  # plain data parallel, and ZeRO-3 (sharded blocks)
        run_train(argv(setup, tmp_path / name, "--max-steps", "3", "--pref-loss", "ipo", "--batch-size", "1",
                       "--grad-accum", "2", "--zero", zero), ranks=2)
    want = metrics(tmp_path / "one")
    for name in ("accum", "ranks", "zero3"):
        got = metrics(tmp_path / name)
        for a, b in zip(want, got):
            for k in ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected"):
                assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])), (name, k, a[k], b[k])
            for side in ("chosen", "rejected"):  # beta * (log pi - log pi_ref): fp32 rounds it relative to the
                k = f"rewards/{side}"                 # summed log-probs it is the difference of, not to itself
                scale = train.TrainConfig().beta * abs(a[f"logps/{side}"])
                assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k]), scale), (name, k, a[k], b[k], scale)


def test_preference_flags_are_checked_before_anything_is_written(setup, tmp_path):
    for extra, msg in ((["--pack"], "--pack: not with --stage dpo"),
                       (["--truncation", "keep-end"], "--truncation keep-end: not with --stage dpo"),
                       (["--stream", "--max-steps", "2"], "--stream: not with --stage dpo"),
                       (["--beta", "0"], "--beta 0.0: expected a number > 0"),
                       (["--pref-loss", "hinge"], "--pref-loss 'hinge': expected one of sigmoid, robust, ipo, simpo, orpo")):
        with pytest.raises(SystemExit, match=msg):
            train.main(argv(setup, tmp_path / "x", *extra))
        assert not (tmp_path / "x").exists()


def test_full_fine_tuning_reference_copy_or_precomputed_give_the_same_run(setup, tmp_path):
    """Full FT: a frozen copy of the initial model, or its log-probs computed once (--precompute-ref, no copy)."""
    for name, extra in (("copy", []), ("pre", ["--precompute-ref"])):
        train.main(argv(setup, tmp_path / name, "--method", "full", "--lr", "1e-3", "--batch-size", "4",
                        "--max-steps", "3", *extra))
    a, b = metrics(tmp_path / "copy"), metrics(tmp_path / "pre")
    assert abs(a[0]["loss"] - math.log(2)) < 1e-6  # the policy is the reference at step 1
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 and abs(x["rewards/margins"] - y["rewards/margins"]) <= 1e-6


@pytest.mark.parametrize("method", ["prefix", "prompt", "ia3", "bitfit", "llama_adapter", "qlora"])
def test_every_method_starts_at_log2_and_learns(setup, tmp_path, method):
    """The adapter switched off is the reference for every PEFT method: at init (identity adapters) the margins
    are 0; prompt methods are not identities at init, so only their training is checked (every step sees the
    same 16 pairs: the mean margin over them must grow)."""
    extra = {"bitfit": ["--bitfit-targets", "all-linear"], "llama_adapter": ["--adapter-layers", "2"]}.get(method, [])
    train.main(argv(setup, tmp_path / method, "--method", method, "--batch-size", "16", "--max-steps", "4", *extra))
    m = metrics(tmp_path / method)
    if method not in ("prefix", "prompt"):
        assert abs(m[0]["loss"] - math.log(2)) < 1e-6
    assert m[-1]["rewards/margins"] > m[0]["rewards/margins"]


def test_dpo_resume_after_sigkill_is_bit_identical(setup, tmp_path):
    from tests.test_train import KILL_AFTER_SAVE_5
    from safetensors.torch import load_file
    flags = ["--batch-size", "4", "--max-steps", "8", "--save-every", "5", "--lora-dropout", "0.1"]
    train.main(argv(setup, tmp_path / "a", *flags))
    r = run_train(argv(setup, tmp_path / "b", *flags), patch=KILL_AFTER_SAVE_5, check=False)
    assert r.returncode == -9 and train.complete_checkpoints(tmp_path / "b") == [5]
    run_train(argv(setup, tmp_path / "b", *flags, "--resume"))
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [(x["step"], x["loss"], x["rewards/margins"]) for x in a] == \
        [(x["step"], x["loss"], x["rewards/margins"]) for x in b]
    wa, wb = (load_file(str(tmp_path / n / "adapter" / "adapter_model.safetensors")) for n in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_data_inspect_shows_pairs_with_the_trained_tokens_marked(setup, capsys):
    from data import inspect
    inspect.main(["--model", setup["model"], "--data", setup["data"], "--stage", "dpo", "-n", "1"])
    out = capsys.readouterr().out
    assert "--- 0 chosen" in out and "--- 0 rejected" in out and "16 records, 16 pairs" in out
    assert out.count("⟦") == 2  # one trained run per row: the completion and its end-of-turn
