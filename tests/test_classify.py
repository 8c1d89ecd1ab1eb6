"""Sequence classification and reward heads (model/classify.py, data/classify.py, train.py --task) against
transformers' LlamaForSequenceClassification / Qwen2ForSequenceClassification and HF PEFT (task_type SEQ_CLS), on
tiny random models in fp32. All the reference work runs in one subprocess (module fixture `ref`)."""
import json

import pytest
import torch

import data
import model as M
import peft
import predict
import train
from model import classify
from tests.reference import padded_batch, run_reference, tiny_hf_config
from tests.tiny import make_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ("llama", "qwen2")
PADS = {"pad_ne_eos": 0, "pad_eq_eos": 2}   # tiny_hf_config: eos 2
STEPS = 10
RUN = ["--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--weight-decay", "0.01", "--warmup", "3",
       "--schedule", "cosine", "--max-grad-norm", "1.0", "--seed", "3", "--lora-r", "4", "--lora-alpha", "8",
       "--lora-targets", "all-linear", "--max-steps", str(STEPS), "--quiet"]


def padded(pad: int):
    """padded_batch's ids (row 0 full, row 1 left-padded, row 2 right-padded) with pad tokens where the mask is 0;
    row 0 ends with eos (2): with pad == eos transformers' rule skips it as padding."""
    ids, mask = padded_batch(12)
    ids = ids.masked_fill(mask == 0, pad)
    ids[0, -1] = 2
    return ids, mask


def texts(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    words = {"pos": ["good", "fun", "warm", "great"], "neg": ["bad", "dull", "slow", "awful"]}
    out = []
    for i in range(n):
        lab = "pos" if torch.rand(1, generator=g) < 0.5 else "neg"
        k = 1 + int(torch.randint(6, (1,), generator=g))
        out.append({"text": " ".join(words[lab][int(j)] for j in torch.randint(4, (k,), generator=g)), "label": lab})
    return out


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("classify")
    base = make_model(d / "base", seed=1)
    write_jsonl(d / "train.jsonl", texts(48, 2))
    # ours: 10 steps of --task classify --method lora, and the run's initial adapter (same seed, same order as main)
    argv = ["--model", str(base), "--data", str(d / "train.jsonl"), "--out", str(d / "run"), "--task", "classify",
            "--method", "lora", *RUN]
    train.main(argv)
    cfg = train.parse_args(argv)
    tok = M.load_tokenizer(base)
    exs, _, _ = data.classify.load_splits(tok, cfg, verbose=False)
    torch.manual_seed(cfg.seed)
    init = classify.attach_task(train.build_model(cfg, torch.device("cpu")), cfg, tok)
    peft.save_adapter(init, d / "init", base_model_path=str(base))
    order = data.BatchOrder([len(e) for e in exs], cfg.batch_size, cfg.seed)
    inputs = {}
    for i in range(STEPS):
        (b,) = order.micro_batches(exs, i, 0, 1, cfg.batch_size, 1, tok.pad_id)
        am = b["attention_mask"] if b["attention_mask"] is not None else torch.ones_like(b["input_ids"])
        inputs.update({f"{i}.ids": b["input_ids"], f"{i}.mask": am, f"{i}.labels": b["class_labels"]})
    for pad in PADS.values():
        ids, mask = padded(pad)
        inputs.update({f"pad{pad}.ids": ids, f"pad{pad}.mask": mask})
    cfgs = {f"{a}-{p}": tiny_hf_config(a, pad_token_id=pad) for a in ARCHS for p, pad in PADS.items()}
    out = run_reference(f"""
        torch.set_num_threads(1)
        from transformers import AutoConfig, AutoModelForSequenceClassification, get_cosine_schedule_with_warmup
        from peft import LoraConfig, PeftModel, get_peft_model
        import torch.nn.functional as F
        x, out, d = load_file("in.safetensors"), {{}}, {str(d)!r}
        for name, c in json.loads({json.dumps(json.dumps(cfgs))}).items():
            torch.manual_seed(0)
            m = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**c, num_labels=3))
            with torch.no_grad():  # norms and biases randomised so they are tested
                for n, p in m.named_parameters():
                    if n.endswith("norm.weight") or n.endswith("bias"):
                        p.add_(torch.randn_like(p) * 0.1)
            m.save_pretrained(f"{{d}}/hf-{{name}}")
            pad = c["pad_token_id"]
            with torch.no_grad():
                out[f"{{name}}.logits"] = m(input_ids=x[f"pad{{pad}}.ids"], attention_mask=x[f"pad{{pad}}.mask"]).logits
        # the 10-step loss curve: HF + PEFT from our initial adapter (LoRA + the score head as modules_to_save)
        m = AutoModelForSequenceClassification.from_pretrained({str(base)!r}, num_labels=2)
        m = PeftModel.from_pretrained(m, f"{{d}}/init", is_trainable=True)
        named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
        groups = [{{"params": [p for n, p in named if p.dim() >= 2], "weight_decay": 0.01}},
                  {{"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0}}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
        sched = get_cosine_schedule_with_warmup(opt, 3, {STEPS})
        m.train()
        losses = []
        for i in range({STEPS}):
            loss = m(input_ids=x[f"{{i}}.ids"], attention_mask=x[f"{{i}}.mask"], labels=x[f"{{i}}.labels"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
            opt.step(); sched.step(); opt.zero_grad()
            losses.append(loss.item())
        out["losses"] = torch.tensor(losses, dtype=torch.float64)
        out["names"] = torch.tensor([len(named)])
        # our trained adapter in PEFT
        m = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained({str(base)!r}, num_labels=2),
                                      f"{{d}}/run/adapter").eval()
        with torch.no_grad():
            out["ours_in_peft"] = m(input_ids=x["0.ids"], attention_mask=x["0.mask"]).logits
        # PEFT's adapter (random LoRA B and head) for ours
        torch.manual_seed(1)
        m = get_peft_model(AutoModelForSequenceClassification.from_pretrained({str(base)!r}, num_labels=2),
                           LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear",
                                      init_lora_weights=False))
        m.save_pretrained(f"{{d}}/peft-adapter")
        with torch.no_grad():
            out["peft_logits"] = m.eval()(input_ids=x["0.ids"], attention_mask=x["0.mask"]).logits
        # reward: a hand-written Bradley-Terry loss on a 1-label classifier, and its gradients
        torch.manual_seed(2)
        c = json.loads({json.dumps(json.dumps(cfgs['llama-pad_ne_eos']))})
        m = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**c, num_labels=1))
        m.save_pretrained(f"{{d}}/hf-reward")
        r = m(input_ids=x["pad0.ids"][[0, 1, 2, 2]], attention_mask=x["pad0.mask"][[0, 1, 2, 2]]).logits[:, 0]
        r2 = m(input_ids=x["pad0.ids"][[1, 2, 0, 1]], attention_mask=x["pad0.mask"][[1, 2, 0, 1]]).logits[:, 0]
        loss = -F.logsigmoid(r - r2).mean()
        loss.backward()
        out["reward_loss"] = loss.detach()
        out.update({{"grad." + n: p.grad for n, p in m.named_parameters()}})
        save_file({{k: v.contiguous() for k, v in out.items()}}, "out.safetensors")
    """, d / "ref", inputs)
    return {"dir": d, "base": base, "inputs": inputs, "out": out}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pads", PADS)
def test_logits_equal_transformers_left_and_right_padding(ref, arch, pads):
    pad = PADS[pads]
    m = classify.load(ref["dir"] / f"hf-{arch}-{pads}")
    assert m.pad_token_id == pad and m.labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    x = ref["inputs"]
    with torch.no_grad():
        got = classify.logits(m, x[f"pad{pad}.ids"], x[f"pad{pad}.mask"])
    want = ref["out"][f"{arch}-{pads}.logits"]
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_pooled_position_is_transformers_rule():
    ids = torch.tensor([[5, 6, 2, 2], [0, 0, 7, 8], [9, 0, 0, 0], [0, 0, 0, 0]])
    assert classify.last_token(ids, 2).tolist() == [1, 3, 3, 3]   # pad == eos: trailing eos is padding
    assert classify.last_token(ids, 0).tolist() == [3, 3, 0, 0]   # all pad: position 0, as transformers


def test_loss_curve_equals_hf_peft(ref):
    got = torch.tensor([r["loss"] for r in map(json.loads, (ref["dir"] / "run" / "metrics.jsonl").read_text()
                                               .splitlines()) if "loss" in r], dtype=torch.float64)
    assert len(got) == STEPS and got[-3:].mean() < got[:3].mean() - 0.05  # it learns
    torch.testing.assert_close(got, ref["out"]["losses"], rtol=1e-4, atol=0)
    run_cfg = json.loads((ref["dir"] / "run" / "config.json").read_text())
    assert run_cfg["labels"] == "neg,pos" and run_cfg["task"] == "classify"


def test_our_adapter_loads_in_peft_and_peft_adapter_loads_in_ours(ref):
    x = ref["inputs"]
    ad = json.loads((ref["dir"] / "run" / "adapter" / "adapter_config.json").read_text())
    assert ad["task_type"] == "SEQ_CLS" and ad["modules_to_save"] == ["classifier", "score"]
    for adapter, want in (("run/adapter", "ours_in_peft"), ("peft-adapter", "peft_logits")):
        m = predict.load(ref["base"], str(ref["dir"] / adapter))
        with torch.no_grad():
            got = classify.logits(m.eval(), x["0.ids"], x["0.mask"])
        torch.testing.assert_close(got, ref["out"][want], atol=1e-5, rtol=0)
    assert m.labels == ["LABEL_0", "LABEL_1"]  # PEFT's adapter has no head.json
    assert peft.unwrap(predict.load(ref["base"], str(ref["dir"] / "run" / "adapter"))).labels == ["neg", "pos"]


def test_reward_loss_and_grads_equal_hand_written_bradley_terry(ref):
    m = classify.load(ref["dir"] / "hf-reward").train()
    x = ref["inputs"]
    rows_c, rows_r = [0, 1, 2, 2], [1, 2, 0, 1]
    batch = {"input_ids": x["pad0.ids"][rows_c + rows_r], "attention_mask": x["pad0.mask"][rows_c + rows_r],
             "position_ids": None, "pairs": 4}
    cfg = train.TrainConfig(task="reward")
    s, logs = classify.loss_sum(m, batch, torch.device("cpu"), cfg)
    (s / 4).backward()
    out = ref["out"]
    torch.testing.assert_close(s.detach() / 4, out["reward_loss"], atol=1e-5, rtol=0)
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert set(grads) == {k[5:] for k in out if k.startswith("grad.")}
    for n, g in grads.items():
        torch.testing.assert_close(g, out["grad." + n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "bitfit", "adapter", "prefix", "prompt", "ptuning",
                                    "llama_adapter", "adalora", "mam", "unipelt"])
def test_every_method_trains_the_head_and_saved_adapter_reloads(tmp_path, method):
    """The head is trainable under each method, saved with its adapter, and base + adapter reload to the same
    logits (predict.load)."""
    base = make_model(tmp_path / "m", seed=1)
    args = {"bitfit": {"bitfit_targets": ["q_proj"]}, "llama_adapter": {"adapter_layers": 2}}.get(method, {})
    cfg = peft.method_config(method, args, str(base))
    torch.manual_seed(0)
    m = peft.apply(M.load_pretrained(base), cfg)
    classify.attach(m, 3, 0, ["a", "b", "c"])
    assert peft.unwrap(m).score.weight.requires_grad
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # away from init (LoRA B = 0, gates 0, ...)
    peft.save_adapter(m, tmp_path / "ad", base_model_path=str(base))
    ids, mask = padded(0)
    with torch.no_grad():
        want = classify.logits(m.eval(), ids, mask)
        got = classify.logits(predict.load(base, str(tmp_path / "ad")).eval(), ids, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_merged_classifier_saves_transformers_format(tmp_path):
    base = make_model(tmp_path / "m", seed=1)
    m = peft.apply(M.load_pretrained(base), peft.LoraConfig(r=2, targets="all-linear"))
    classify.attach(m, 2, 0, ["neg", "pos"])
    merged = peft.merge_and_unload(m)
    classify.save_pretrained(merged, tmp_path / "out")
    c = json.loads((tmp_path / "out" / "config.json").read_text())
    assert c["architectures"] == ["LlamaForSequenceClassification"] and c["id2label"] == {"0": "neg", "1": "pos"}
    assert c["label2id"] == {"neg": 0, "pos": 1} and c["pad_token_id"] == 0
    keys = set(M.io.stored_shapes(tmp_path / "out" / "model.safetensors"))
    assert "score.weight" in keys and "lm_head.weight" not in keys
    ids, mask = padded(0)
    with torch.no_grad():
        torch.testing.assert_close(classify.logits(classify.load(tmp_path / "out"), ids, mask),
                                   classify.logits(merged, ids, mask), atol=1e-6, rtol=0)


def test_macro_f1():
    pred, y = torch.tensor([0, 0, 1, 1, 2, 0]), torch.tensor([0, 1, 1, 1, 2, 2])
    # class 0: tp 1 fp 2 fn 0 -> 0.5; class 1: tp 2 fp 0 fn 1 -> 0.8; class 2: tp 1 fp 0 fn 1 -> 2/3
    assert abs(classify.macro_f1(pred, y, 3) - (0.5 + 0.8 + 2 / 3) / 3) < 1e-12


# --- data: labels, CSV, bad input --------------------------------------------------------------------------------
def _splits(tmp_path, train_recs, eval_recs=None, csv=False, **kw):
    base = make_model(tmp_path / "m", seed=1)
    if csv:
        f = tmp_path / "train.csv"
        f.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in train_recs))
    else:
        f = write_jsonl(tmp_path / "train.jsonl", train_recs)
    argv = ["--model", str(base), "--data", str(f), "--task", "classify", "--out", str(tmp_path / "o")]
    if eval_recs is not None:
        argv += ["--eval-data", str(write_jsonl(tmp_path / "eval.jsonl", eval_recs))]
    cfg = train.parse_args(argv + [x for k, v in kw.items() for x in ("--" + k, v)])
    return cfg, data.classify.load_splits(M.load_tokenizer(base), cfg, verbose=False)


def test_string_labels_csv_and_int_labels(tmp_path):
    recs = [{"text": "nice one", "label": "pos"}, {"text": "poor", "label": "neg"}, {"text": "ok", "label": "mid"}]
    cfg, (tr, _, st) = _splits(tmp_path, recs, csv=True)
    assert cfg.labels == "mid,neg,pos" and [e.label for e in tr] == [2, 1, 0] and st["records"] == 3
    cfg, (tr, _, _) = _splits(tmp_path, recs, labels="neg,mid,pos")
    assert [e.label for e in tr] == [2, 0, 1]
    cfg, (tr, _, _) = _splits(tmp_path, [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    assert cfg.labels == "LABEL_0,LABEL_1,LABEL_2" and [e.label for e in tr] == [0, 2]
    b = data.collate(tr, 0)
    assert b["class_labels"].tolist() == [0, 2] and data.count_targets(b) == 2


@pytest.mark.parametrize("case", ["unseen_eval_label", "not_in_labels", "one_class", "mixed", "no_label"])
def test_bad_labels_are_one_line_errors_naming_file_line(tmp_path, case):
    recs = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    kw, ev, where = {}, None, "train.jsonl:"
    if case == "unseen_eval_label":
        ev, where, msg = [{"text": "meh", "label": "pos"}, {"text": "so so", "label": "mid"}], "eval.jsonl:2", \
            "label 'mid' is not in the label set of the training data (neg, pos)"
    elif case == "not_in_labels":
        kw, where, msg = {"labels": "neg,mid"}, "train.jsonl:1", "label 'pos' is not in the label set of --labels"
    elif case == "one_class":
        recs, where, msg = [{"text": "good", "label": "pos"}] * 3, "train.jsonl", "one class only"
    elif case == "mixed":
        recs, where, msg = recs + [{"text": "x", "label": 1}], "train.jsonl:3", "labels mix strings and integers"
    else:
        recs, where, msg = recs + [{"text": "x"}], "train.jsonl:3", "needs fields 'text' and 'label'"
    with pytest.raises(data.DataError) as e:
        _splits(tmp_path, recs, ev, **kw)
    assert where in str(e.value) and msg in str(e.value) and "\n" not in str(e.value)


def test_train_refuses_task_with_preference_stage_and_bad_task(tmp_path):
    for extra, msg in ((["--task", "nope"], "--task 'nope'"), (["--task", "classify", "--stage", "dpo"], "not with"),
                       (["--labels", "a,b"], "--labels: for --task classify")):
        with pytest.raises(SystemExit) as e:
            train.parse_args(["--data", "x.jsonl", *extra])
        assert msg in str(e.value)


def test_sft_adapter_refuses_a_head_and_vice_versa(ref, tmp_path):
    with pytest.raises(ValueError, match="holds a classification head"):
        peft.load_adapter(M.load_pretrained(ref["base"]), ref["dir"] / "run" / "adapter")
    m = peft.apply(M.load_pretrained(ref["base"]), peft.LoraConfig(r=2))
    peft.save_adapter(m, tmp_path / "sft")
    with pytest.raises(ValueError, match="no score.weight"):
        predict.load(ref["base"], str(tmp_path / "sft"))


def test_reward_run_reports_pair_accuracy_and_saves_a_transformers_classifier(tmp_path):
    base = make_model(tmp_path / "m", seed=1)
    pairs = [{"prompt": "q" * (1 + i % 3), "chosen": "good", "rejected": "bad" * (1 + i % 2)} for i in range(12)]
    f = write_jsonl(tmp_path / "pref.jsonl", pairs)
    train.main(["--model", str(base), "--data", str(f), "--eval-data", str(f), "--out", str(tmp_path / "rw"),
                "--task", "reward", "--method", "full", "--max-steps", "3", "--eval-every", "3", "--quiet"])
    recs = [json.loads(x) for x in (tmp_path / "rw" / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in recs if "eval_accuracy" in r]
    assert len(ev) == 1 and 0 <= ev[0]["eval_accuracy"] <= 1 and "eval_macro_f1" not in ev[0]
    m = classify.load(tmp_path / "rw" / "model")
    assert m.score.weight.shape == (1, 32)
    (out,) = predict.main(["--model", str(tmp_path / "rw" / "model"), "--text", "qgood"])
    assert set(out) == {"text", "score"}


def test_predict_cli_labels_and_data_accuracy(ref, capsys):
    x = predict.main(["--model", str(ref["base"]), "--adapter", str(ref["dir"] / "run" / "adapter"),
                      "--data", str(ref["dir"] / "train.jsonl"), "--text", "good fun"])
    assert x[0]["label"] in ("neg", "pos") and abs(sum(x[0]["probabilities"].values()) - 1) < 1e-5
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["examples"] == 48 and 0 <= line["accuracy"] <= 1
