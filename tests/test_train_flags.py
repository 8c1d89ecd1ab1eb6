"""train.py's --grad-checkpointing, --pack, --precision bf16/fp16 and --eval-split, end to end: every run goes
through the CLI entry `train.main(argv)` and is judged by what it writes in --out (metrics.jsonl, the saved
model/adapter) and prints, against an un-flagged run or a recomputation with the model/ and data/ APIs.
Tiny random models, a few steps each."""
import ast
import contextlib
import io
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data
import model as M
import train
from model.model import Block
from tests.tiny import chat_records, make_model, make_tokenizer, run_inputs, tiny_config, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--seq-len", "256", "--lr", "1e-3", "--warmup", "0", "--schedule", "cosine", "--max-grad-norm", "1.0",
          "--seed", "3", "--eval-samples", "0"]
LORA = ["--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1"]  # dropout: the RNG matters too
STEPS = ["--max-steps", "4", "--batch-size", "8"]                         # 24 examples: 3 batches, then epoch 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    s = run_inputs(tmp_path_factory.mktemp("flags"), 24)
    s["runs"] = {}  # (tag, *argv) -> (out dir, stdout): the un-flagged baselines are shared by the tests below
    return s


def run(s, *extra, method="full", data_path=None, model_path=None, tag="") -> tuple[Path, str]:
    """train.main on the tiny model/data (or others); -> (out dir, what it printed). Cached by argv (and tag:
    another tag, another run)."""
    argv = ["--model", model_path or s["model"], "--data", data_path or s["data"], "--method", method, *COMMON,
            *(LORA if method == "lora" else []), *extra]
    key = (tag, *argv)
    if key not in s["runs"]:
        out = s["dir"] / f"run-{len(s['runs'])}"
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):  # the data line (print) and eval Q/A lines (tqdm.write)
            train.main(argv + ["--out", str(out)])
        s["runs"][key] = (out, buf.getvalue())
    return s["runs"][key]


def records(out) -> list[dict]:
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def steps(out) -> list[dict]:
    return [r for r in records(out) if "loss" in r]


def col(out, key) -> torch.Tensor:
    return torch.tensor([r[key] for r in steps(out)], dtype=torch.float64)


def final_weights(out) -> dict:
    out = Path(out)
    f = out / "model" / "model.safetensors"
    return load_file(str(f if f.exists() else out / "adapter" / "adapter_model.safetensors"))


def example_losses(model, exs, pad_id) -> list[tuple[float, int]]:
    """(sum of next-token CEs, number of targets) of each example alone, from full logits (no train.py code)."""
    out = []
    for e in exs:
        b = data.collate([e], pad_id)
        with torch.no_grad():
            lg = model(b["input_ids"])
        out.append((F.cross_entropy(lg[0, :-1], b["labels"][0, 1:], reduction="sum").item(), data.count_targets(b)))
    return out


# --- --grad-checkpointing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,extra", [("full", []), ("lora", []), ("lora", ["--precision", "bf16"])],
                         ids=["full", "lora-dropout", "lora-bf16"])
def test_grad_checkpointing_same_losses_and_weights(setup, monkeypatch, method, extra):
    """Recomputing each layer in backward changes no number: per-step losses, gradient norms and the final
    weights equal the un-flagged run's (<= 1e-6; they are the same ops on the same inputs). With LoRA dropout the
    recomputation must redraw the same masks, under bf16 the same autocast state. And the layers really are
    recomputed: each decoder layer's forward runs twice per micro-batch (forward, then again in backward)."""
    calls = []
    orig = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    a, _ = run(setup, *STEPS, *extra, method=method)
    n_plain, calls[:] = len(calls), []
    b, _ = run(setup, *STEPS, *extra, "--grad-checkpointing", method=method)
    forwards = tiny_config()["num_hidden_layers"] * 4  # 4 steps of one micro-batch
    assert (n_plain, len(calls)) == (forwards, 2 * forwards)
    assert len(col(a, "loss")) == 4 and col(a, "loss")[-1] < col(a, "loss")[0]  # it learns
    torch.testing.assert_close(col(b, "loss"), col(a, "loss"), rtol=0, atol=1e-6)
    torch.testing.assert_close(col(b, "grad_norm"), col(a, "grad_norm"), rtol=0, atol=1e-6)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)


# --- --pack ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "mistral-window16"])
def test_pack_first_step_loss_equals_unpacked(setup, arch):
    """One global batch holding every example (batch size 32 > 24 examples): the packed step trains the same
    tokens, so its loss (the token-weighted mean CE at the initial weights) equals the unpacked step's and a
    recomputation from full logits, one example at a time, to 1e-5 (fp32, different summation orders), and the
    same trained_tokens / tokens are counted. Later steps follow from one AdamW update of gradients that differ
    only by rounding: 1e-4. mistral-window16: a Mistral whose 16-token window is shorter than every example."""
    path = setup["model"]
    if arch != "llama":
        path = str(make_model(setup["dir"] / arch, seed=1, model_type="mistral", sliding_window=16,
                              architectures=["MistralForCausalLM"]))
    a, _ = run(setup, "--max-steps", "3", "--batch-size", "32", model_path=path)
    b, _ = run(setup, "--max-steps", "3", "--batch-size", "32", "--pack", model_path=path)
    tok = M.load_tokenizer(path)
    exs, st = data.load_examples(tok, [setup["data"]], 256)
    per = example_losses(M.load_pretrained(path), exs, tok.pad_id)
    want = sum(l for l, _ in per) / sum(n for _, n in per)
    la, lb = col(a, "loss"), col(b, "loss")
    assert abs(la[0] - want) < 1e-5
    assert torch.isfinite(lb).all() and len(lb) == 3
    for k, counts in (("trained_tokens", [st["trained_tokens"]] * 3),
                      ("tokens", [st["tokens"] * i for i in (1, 2, 3)])):  # tokens: cumulative
        assert [r[k] for r in steps(b)] == [r[k] for r in steps(a)] == counts
    assert abs(lb[0] - want) < 1e-5, (lb[0].item(), want)
    torch.testing.assert_close(lb, la, rtol=0, atol=1e-4)


def test_pack_rows_hold_several_examples_each_trained_once(setup):
    """One epoch of rows, one row a step: fewer steps than examples (= data.pack's row count), every row within
    --seq-len tokens, and over the epoch every example's tokens and trained tokens counted exactly once."""
    out, _ = run(setup, "--epochs", "1", "--batch-size", "1", "--pack")
    tok = M.load_tokenizer(setup["model"])
    exs, st = data.load_examples(tok, [setup["data"]], 256)
    rows = data.pack(exs, 256)
    recs = steps(out)
    assert len(recs) == len(rows) < len(exs) // 2
    per_step = [r["tokens"] - p for r, p in zip(recs, [0] + [r["tokens"] for r in recs[:-1]])]
    assert max(per_step) <= 256 and recs[-1]["tokens"] == st["tokens"]
    assert sum(r["trained_tokens"] for r in recs) == st["trained_tokens"]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in recs)


# --- --precision bf16 / fp16 ------------------------------------------------------------------------------------
# Unit roundoff u = 2^-p for p significant bits: bf16 has 8 (u = 2^-8 = 3.9e-3), fp16 11 (u = 2^-11 = 4.9e-4).
# Autocast rounds the operands of every matrix product to that precision (products accumulate in fp32).
# - loss: rounding each logit's operands alone moves it by ~u relative; the mean over ~150 tokens averages those
#   errors down, so rtol u per step bounds it with margin (seen: 2e-4 bf16, 2e-5 fp16);
# - grad_norm at step 1 (same weights): backward chains ~10 rounded products through 2 blocks, rtol 8u;
# - weights: AdamW's update is ~lr * sign(g), so a rounding that flips a near-zero gradient component moves that
#   weight by up to 2 lr: the update (final - initial) is compared by direction, cosine > 0.95, not elementwise.
U = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_precision_close_to_fp32_and_master_weights_stay_fp32(setup, method, precision):
    """Autocast changes the numbers (within the dtype's tolerance above), the run learns, fp16's gradients are
    unscaled before clipping and logging, and the weights are updated in fp32 (LoRA + bf16: the frozen base is
    stored in bf16, the adapter is not)."""
    a, _ = run(setup, *STEPS, method=method)
    b, _ = run(setup, *STEPS, "--precision", precision, method=method)
    la, lb = col(a, "loss"), col(b, "loss")
    assert torch.isfinite(lb).all() and torch.isfinite(col(b, "grad_norm")).all() and len(lb) == 4
    assert lb[0] != la[0]  # autocast is on: rounded operands give a different (but close) number
    torch.testing.assert_close(lb, la, rtol=U[precision], atol=0)
    assert lb[-1] < lb[0] - 0.01  # it learns
    # fp16: the gradients were unscaled before clipping and logging (else x 2^16, GradScaler's initial scale)
    torch.testing.assert_close(col(b, "grad_norm")[0], col(a, "grad_norm")[0], rtol=8 * U[precision], atol=0)
    assert [r["trained_tokens"] for r in steps(b)] == [r["trained_tokens"] for r in steps(a)]
    wa, wb = final_weights(a), final_weights(b)
    if method == "full":
        init, keys = load_file(str(Path(setup["model"]) / "model.safetensors")), sorted(wb)
    else:  # lora_B starts at 0 (lora_A's random start is not in the outputs)
        keys = sorted(k for k in wb if "lora_B" in k)
        init = {k: torch.zeros_like(wb[k]) for k in keys}
    da = torch.cat([(wa[k] - init[k]).flatten() for k in keys])
    db = torch.cat([(wb[k] - init[k]).flatten() for k in keys])
    assert db.abs().max() > 1e-4 and F.cosine_similarity(da, db, dim=0) > 0.95
    # fp32 master weights: saved in fp32, and the updated ones are not on the half-precision grid
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert all(w.dtype == torch.float32 for w in wb.values())
    moved = torch.cat([wb[k].flatten()[(wb[k] != init[k]).flatten()] for k in keys])
    assert (moved.to(half).float() != moved).float().mean() > 0.9


def test_fp16_loss_scale_skips_overflowing_steps_and_backs_off(setup):
    """A model with N(0, 1) weights: its fp16 backward overflows at GradScaler's initial scale 2^16 (its fp32
    gradients are finite, norm ~20). The scaler must skip those steps (non-finite grad_norm logged, the weights
    untouched: the same batch gives the same loss, the LR schedule not advanced), halve the scale and then
    train: finite gradient norm, lower loss, finite weights. Without loss scaling no step would be skipped; without the skip the inf
    gradients would reach the weights and the next loss would be NaN (train.py stops)."""
    d = setup["dir"] / "big-init"
    m = M.Transformer(M.ModelConfig.from_hf(tiny_config())).init_weights(1.0, seed=1)
    M.save_pretrained(m, d)
    make_tokenizer(d)
    dat = write_jsonl(setup["dir"] / "eight.jsonl", chat_records(8, seed=2))
    kw = dict(model_path=str(d), data_path=str(dat))
    a, _ = run(setup, "--max-steps", "5", "--batch-size", "8", **kw)  # one batch: the same 8 examples every step
    b, _ = run(setup, "--max-steps", "5", "--batch-size", "8", "--precision", "fp16", **kw)
    assert all(math.isfinite(g) for g in col(a, "grad_norm").tolist()) and col(a, "loss")[1] < col(a, "loss")[0]
    g, lb = col(b, "grad_norm").tolist(), col(b, "loss").tolist()
    k = next(i for i, x in enumerate(g) if math.isfinite(x))  # leading skipped steps
    assert 1 <= k <= 3
    # skipped steps left the weights as they were: the same loss up to summation order (each step is a new
    # epoch, which reorders the batch's rows), 1e-6 relative; the one step taken moves it by ~0.7 (fp32 run)
    assert all(abs(x - lb[0]) < 1e-6 * lb[0] for x in lb[:k + 1])
    assert lb[k + 1] < lb[k] and math.isfinite(lb[-1])  # then a step was taken
    assert abs(lb[0] - col(a, "loss")[0]) < U["fp16"] * lb[0]
    # the LR schedule waits during skipped steps (as HF Trainer's): the taken steps follow the fp32 run's cosine
    assert col(b, "lr").tolist()[k:] == col(a, "lr").tolist()[:5 - k] and col(a, "lr")[1] < col(a, "lr")[0]
    w = final_weights(b)
    init = load_file(str(d / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values()) and any(not torch.equal(w[n], init[n]) for n in w)


# --- --eval-split ---------------------------------------------------------------------------------------------
SPLIT = ["--eval-split", "0.25", "--max-steps", "2", "--eval-every", "2", "--batch-size", "16"]  # 9 train: 1 batch


@pytest.fixture(scope="module")
def split(setup):
    """12 records, 3 held out. The held-out set is read off the outputs, not re-derived from train.py's code:
    under the saved model, exactly one 3-subset of the 12 examples has a token-weighted CE equal to the logged
    eval_loss (1e-5: fp32, different batching and chunking)."""
    dat = str(write_jsonl(setup["dir"] / "split.jsonl", chat_records(12, seed=4)))
    tok = M.load_tokenizer(setup["model"])
    exs, st = data.load_examples(tok, [dat], 256)
    assert st["examples"] == st["records"] == 12  # example i is record i

    def held_out(out, seed):
        ev = [r for r in records(out) if "eval_loss" in r]
        assert len(ev) == 1 and ev[0]["step"] == 2
        per = example_losses(M.load_pretrained(Path(out) / "model"), exs, tok.pad_id)
        found = [S for S in itertools.combinations(range(12), 3)
                 if abs(sum(per[i][0] for i in S) / sum(per[i][1] for i in S) - ev[0]["eval_loss"]) < 1e-5]
        assert len(found) == 1, f"seed {seed}: {len(found)} subsets match eval_loss {ev[0]['eval_loss']}"
        return found[0], ev[0]

    runs = {}
    for seed in ("5", "6"):
        out, printed = run(setup, *SPLIT, "--seed", seed, data_path=dat)
        held, ev = held_out(out, seed)
        runs[seed] = dict(out=out, printed=printed, held=held, ev=ev)
    return dict(data=dat, exs=exs, stats=st, tok=tok, runs=runs, held_out=held_out)


def test_eval_split_holds_out_examples_and_eval_loss_is_theirs(split):
    r = split["runs"]["5"]
    assert re.search(r"^data: 12 records -> 9 train / 3 eval examples;", r["printed"], re.M)
    # the 3 held-out examples are exactly the ones missing from training: the one global batch holds the 9 others
    n = [e.train[1:].sum() for e in split["exs"]]
    assert [s["trained_tokens"] for s in steps(r["out"])] == [split["stats"]["trained_tokens"]
                                                             - sum(n[i] for i in r["held"])] * 2
    assert abs(r["ev"]["eval_ppl"] - math.exp(r["ev"]["eval_loss"])) < 1e-6 * r["ev"]["eval_ppl"]
    assert r["ev"]["samples"] == []


def test_eval_split_is_deterministic_by_seed(setup, split):
    """The same --seed holds out the same examples (a second run in the same process: same printed data line,
    same metrics); another seed holds out others."""
    r = split["runs"]["5"]
    again, printed = run(setup, *SPLIT, "--seed", "5", data_path=split["data"], tag="again")
    assert printed.splitlines()[0] == r["printed"].splitlines()[0]
    strip = lambda recs: [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in recs]
    assert strip(records(again)) == strip(records(r["out"]))
    assert split["held_out"](again, "5 again")[0] == r["held"]
    assert split["runs"]["6"]["held"] != r["held"]


def test_eval_split_with_pack_splits_examples_then_packs(setup, split):
    """--pack packs the 9 train and the 3 held-out examples separately after the split: the same examples are
    trained (trained_tokens) and the packed eval gives the token-weighted CE of the same 3 held-out examples."""
    r = split["runs"]["5"]
    out, _ = run(setup, *SPLIT, "--seed", "5", "--pack", data_path=split["data"])
    assert [s["trained_tokens"] for s in steps(out)] == [s["trained_tokens"] for s in steps(r["out"])]
    (ev,) = [x for x in records(out) if "eval_loss" in x]
    per = example_losses(M.load_pretrained(out / "model"), split["exs"], split["tok"].pad_id)
    want = sum(per[i][0] for i in r["held"]) / sum(per[i][1] for i in r["held"])
    assert abs(ev["eval_loss"] - want) < 1e-5


def test_eval_split_samples_answer_held_out_prompts(setup, split):
    """The greedy answers printed and logged at each eval are meant to show the model on held-out data, as they
    do with --eval-data: with --eval-split their prompts should be held-out conversations."""
    r = split["runs"]["5"]
    out, printed = run(setup, *SPLIT, "--seed", "5", "--eval-samples", "2", data_path=split["data"])
    (ev,) = [x for x in records(out) if "eval_loss" in x]
    assert len(ev["samples"]) == 2
    # each printed prompt (the end of the conversation up to the first answer, as the model sees it) is the
    # first user turn of a held-out record
    asked = [ast.literal_eval(m) for m in re.findall(r"^  Q: (.*)$", printed, re.M)]
    recs = [p for _, _, p in data.read_records([split["data"]])]
    held = [[m["content"] for m in recs[i] if m["role"] == "user"][0] for i in r["held"]]
    assert len(asked) == 2 and all(any(h in a for h in held) for a in asked), (asked, held)
