"""train.py --stage dpo|kto against TRL 1.16's trainers on the same tiny model, LoRA init, batches and optimizer:
per-step losses and TRL's logged rewards for DPO (sigmoid, IPO, robust with label smoothing), SimPO (CPOTrainer),
ORPO (ORPOTrainer) and KTO (KTOTrainer), 5 steps each, fp32.

TRL runs in one subprocess outside the repo (our peft/ would shadow HF PEFT): it loads our step-0 adapter with
PeftModel.from_pretrained(is_trainable=True), builds each trainer, and for our exact micro-batches (converted to
the trainer's batch layout) calls the trainer's own loss (compute_loss / get_batch_loss_metrics) and steps a
torch AdamW with our settings (constant lr, no clipping, no weight decay).

One difference is TRL's own choice: ORPO's SFT term. TRL's ORPOTrainer takes the NLL over the chosen row's
prompt AND response tokens ("computed over the full prompt and response"); the paper (eq. 2: -1/m log P(y|x), the
response given the prompt) and LLaMA-Factory take it over the response, which we do: the mean over pairs of each
chosen completion's token-mean NLL, i.e. -mean(TRL's average completion log-prob). The ORPO reference below uses
TRL's forward and odds-ratio code with that SFT term, so the rest is compared exactly."""
import json

import pytest
import torch
from safetensors.torch import save_file

import data
import model as M
import peft
import train
from tests.reference import run_reference
from tests.test_train_preference import WORDS, pair_records
from tests.tiny import make_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, B = 5, 4

CASES = {  # name: (train.py flags, data, TRL trainer + its config)
    "sigmoid": (["--beta", "0.1"], "pairs", ("dpo", {"beta": 0.1, "loss_type": ["sigmoid"]})),
    "ipo": (["--pref-loss", "ipo", "--beta", "0.5"], "pairs", ("dpo", {"beta": 0.5, "loss_type": ["ipo"]})),
    "robust": (["--pref-loss", "robust", "--beta", "0.1", "--label-smoothing", "0.2"], "pairs",
               ("dpo", {"beta": 0.1, "loss_type": ["robust"], "label_smoothing": 0.2})),
    "simpo": (["--pref-loss", "simpo", "--beta", "2", "--simpo-gamma", "0.5"], "pairs",
              ("cpo", {"beta": 2.0, "loss_type": "simpo", "simpo_gamma": 0.5, "cpo_alpha": 0.0})),
    "orpo": (["--pref-loss", "orpo", "--beta", "0.1"], "pairs", ("orpo", {"beta": 0.1})),
    "kto": (["--stage", "kto", "--beta", "0.1", "--kto-undesirable-weight", "1.5"], "kto",
            ("kto", {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.5})),
}

TRL = """
import json, torch
from safetensors.torch import load_file
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer
cases = json.load(open("cases.json"))
tok = AutoTokenizer.from_pretrained("m")
kinds = {"dpo": (DPOConfig, DPOTrainer), "cpo": (CPOConfig, CPOTrainer), "orpo": (ORPOConfig, ORPOTrainer),
         "kto": (KTOConfig, KTOTrainer)}
out = {}
for name, (kind, kw) in cases.items():
    t = load_file(f"{name}.safetensors")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("m", dtype=torch.float32), f"{name}.adapter",
                                      is_trainable=True)
    row = {"prompt": "a", "completion": "b", "label": True} if kind == "kto" else \\
        {"prompt": "a", "chosen": "b", "rejected": "c"}
    ds = Dataset.from_list([row, {**row, "label": False}] if kind == "kto" else [row] * 2)
    Config, Trainer = kinds[kind]
    args = Config(output_dir=f"trl_{name}", report_to=[], per_device_train_batch_size=2, use_cpu=True,
                  learning_rate=1e-2, **kw)
    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    m = trainer.model
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    steps = []
    for s in range(%(steps)d):
        batch = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(f"{s}.")}
        if kind == "cpo":
            loss, logged = trainer.get_batch_loss_metrics(m, batch)
        elif kind == "orpo":  # TRL's forward and odds-ratio term; the SFT term on the completion (docstring)
            cl, rl = trainer.concatenated_forward(m, batch)[:2]
            losses, cr, rr, _, _ = trainer.odds_ratio_loss(cl, rl)
            loss = -cl.mean() - losses.mean()
            logged = {"rewards/chosen": cr.mean().item(), "rewards/rejected": rr.mean().item(),
                      "rewards/accuracies": (cr > rr).float().mean().item(), "rewards/margins": (cr - rr).mean().item()}
        else:  # the metrics this step appended (KTO skips rewards/rejected in a batch without undesirable ones)
            before = {k: len(v) for k, v in trainer._metrics["train"].items()}
            loss = trainer.compute_loss(m, batch)
            logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if len(v) > before.get(k, 0)}
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps.append({"loss": loss.item(), **{k: logged[k] for k in logged if k.startswith(("rewards/", "kl"))}})
    out[name] = steps
json.dump(out, open("trl.json", "w"))
""" % {"steps": STEPS}


def trl_batch(kind, b):
    """Our collated preference batch in the layout of the TRL trainer's collator."""
    ids = b["input_ids"]
    am = b["attention_mask"] if b["attention_mask"] is not None else torch.ones_like(ids)
    cm = b["train_mask"].long()
    if kind == "dpo":  # chosen rows then rejected rows, as ours
        return {"input_ids": ids, "attention_mask": am, "completion_mask": cm}
    if kind == "kto":  # rows [0, k): the examples, [k, 2k): their KL rows
        k = b["examples"]
        return {"input_ids": ids[:k], "attention_mask": am[:k], "completion_mask": cm[:k], "KL_input_ids": ids[k:],
                "KL_attention_mask": am[k:], "KL_completion_mask": cm[k:], "label": b["desirable"]}
    p = b["pairs"]  # CPO / ORPO: chosen_* and rejected_* tensors, labels -100 off the completion
    labels = torch.where(b["train_mask"], ids, -100)
    return {f"{side}_{key}": v[sl] for side, sl in (("chosen", slice(0, p)), ("rejected", slice(p, None)))
            for key, v in (("input_ids", ids), ("attention_mask", am), ("labels", labels))}


def records(kind):
    if kind == "pairs":
        return pair_records(16, seed=2)

    def words(i, n):
        return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n))
    return [{"prompt": words(i, 2 + i % 4), "completion": words(5 * i, 1 + i % 3), "label": i % 2 == 0}
            for i in range(16)]  # kto


def test_per_step_losses_and_rewards_equal_trl(tmp_path):
    mdir = make_model(tmp_path / "m", seed=1)
    tok = M.load_tokenizer(mdir)
    files = {k: str(write_jsonl(tmp_path / f"{k}.jsonl", records(k))) for k in ("pairs", "kto")}
    ours, cases = {}, {}
    for name, (flags, d, (kind, kw)) in CASES.items():
        argv = ["--model", str(mdir), "--data", files[d], "--out", str(tmp_path / name), "--stage", "dpo",
                "--method", "lora", "--lr", "1e-2", "--seq-len", "128", "--seed", "3", "--schedule", "constant",
                "--batch-size", str(B), "--max-grad-norm", "0", "--max-steps", str(STEPS), *flags]
        cfg = train.parse_args(argv)
        torch.manual_seed(cfg.seed)  # what train.main does before build_model: the same LoRA init
        peft.save_adapter(train.build_model(cfg, torch.device("cpu")), tmp_path / f"{name}.adapter", mdir)
        exs, _, _ = data.load_splits(tok, cfg, verbose=False)
        order = data.BatchOrder([len(e) for e in exs], B, cfg.seed, bucket=True)
        batches = {f"{s}.{k}": v.contiguous() for s in range(STEPS)
                   for k, v in trl_batch(kind, order.micro_batches(exs, s, 0, 1, B, 1, tok.pad_id)[0]).items()}
        save_file(batches, str(tmp_path / f"{name}.safetensors"))
        train.main(argv)
        ours[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        cases[name] = (kind, kw)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    run_reference(TRL, tmp_path, timeout=900)
    ref = json.loads((tmp_path / "trl.json").read_text())
    worst = {}
    for name in CASES:
        for s, (a, b) in enumerate(zip(ours[name], ref[name])):
            for k in b:
                if k == "kl" or k == "rewards/margins" and name == "kto":
                    continue  # TRL logs z0 itself; ours logs its per-example mean, and KTO margins of means
                err = abs(a[k] - b[k]) / max(abs(b[k]), 1e-3)
                worst[name] = max(worst.get(name, 0.0), err)
                assert err <= 1e-4, (name, s, k, a[k], b[k])
    assert set(worst) == set(CASES)
    print("max relative difference vs TRL per case:", {k: f"{v:.1e}" for k, v in worst.items()})
