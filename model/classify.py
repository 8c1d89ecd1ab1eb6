"""Sequence classification and reward heads: transformers' LlamaForSequenceClassification /
Qwen2ForSequenceClassification (GenericForSequenceClassification) on our decoder.

    logits = score(h_i)   (num_labels,),   score: Linear(D, num_labels, bias=False)
where h_i is the final-normed hidden state of the LAST NON-PAD TOKEN of the row: i = the largest t with
input_ids[t] != pad_token_id (0 when the row is all pad), which handles left and right padding alike; with
pad == eos a row's trailing eos tokens count as padding too (transformers' rule, read from the input ids, not the
attention mask). The head is the module `score` on the Transformer, so checkpoints keep HF's keys (`model.*`,
`score.weight`). The LM head stays while training (unused; tied models share it with the embeddings) and is left
out of saved classifiers, as transformers' classes have none.

Losses (sums over the micro-batch; train.py divides by the global number of rows / pairs):
  classify  cross-entropy over the labels, -log softmax(logits)[y]
  reward    Bradley-Terry (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022, eq. 1): one score r per sequence
            (num_labels = 1), -log sigma(r(x, y_chosen) - r(x, y_rejected))
Eval: classify reports accuracy and macro-F1 (the unweighted mean over classes of 2PR / (P + R)), reward the pair
accuracy (r_chosen > r_rejected).

Under PEFT the head is trained and saved like PEFT's `modules_to_save` (task_type SEQ_CLS): its weight is the
adapter's `base_model.model.score.weight` (peft/__init__.py save_adapter).

`python predict.py --model DIR [--adapter DIR] --text ...` labels texts with such a model (model/ imports
neither peft/ nor data/: the layering of tests/test_architecture.py).
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .io import _weight_files, read_config, read_safetensors, save_pretrained as save, stored_shapes
from .weights import CheckpointError, check_layers, load_state_dict_into, meta_device
from .model import Transformer


def decoder_of(model) -> Transformer:
    """The Transformer inside `model` (itself, or the base of a PEFT prompt wrapper): it holds the head."""
    return next(m for m in model.modules() if isinstance(m, Transformer))


def attach(model, num_labels: int, pad_id: int | None, labels: list[str] | None = None, std: float = 0.02):
    """Give the Transformer under `model` (any PEFT wrapper) a fresh `score` head, initialised like transformers'
    _init_weights (normal(0, initializer_range = 0.02), from the global RNG), trainable whatever the method.
    pad_id: the token the pooling rule skips (the padding token)."""
    base = decoder_of(model)
    w = base.model.embed_tokens.weight
    base.score = nn.Linear(w.shape[1], num_labels, bias=False, device=w.device, dtype=torch.float32)
    with torch.no_grad():
        base.score.weight.normal_(0.0, std)
    base.pad_token_id = pad_id
    base.labels = labels or [f"LABEL_{i}" for i in range(num_labels)]
    return model


TASKS = ("causal_lm", "classify", "reward")


def check_flags(cfg) -> str | None:
    """train.py's --task checks, before anything is loaded: an error message or None."""
    if cfg.task not in TASKS:
        return f"--task {cfg.task!r}: expected one of {', '.join(TASKS)}"
    if cfg.task != "causal_lm" and (cfg.stage != "sft" or cfg.pack or cfg.stream):
        return f"--task {cfg.task}: not with --stage dpo|kto, --pack or --stream (one score per sequence)"
    if cfg.labels and cfg.task != "classify":
        return "--labels: for --task classify"
    return None


def attach_task(model, cfg, tok):
    """train.py: the head of --task classify (one logit per label of cfg.labels) or reward (one score); the pad
    token that the pooling skips is the one batches are padded with. causal_lm: nothing."""
    if cfg.task != "causal_lm":
        labels = cfg.labels.split(",") if cfg.task == "classify" else None
        attach(model, len(labels) if labels else 1, tok.pad_id if tok.pad_id is not None else tok.eos_id, labels)
    return model


def last_token(ids, pad_id: int | None):
    """transformers' pooled position per row (B,): the rightmost token that is not pad_id (0 if none)."""
    if pad_id is None:
        if ids.shape[0] != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        return torch.full((1,), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    t = torch.arange(ids.shape[1], device=ids.device)
    return (t * (ids != pad_id)).argmax(-1)                                     # (B,)


def logits(model, ids, attention_mask=None, position_ids=None):
    """(B, num_labels) fp32 scores of each row at its last non-pad token (transformers' pooled_logits)."""
    base = decoder_of(model)
    hidden = model(ids, attention_mask=attention_mask, position_ids=position_ids, hidden_only=True)  # (B, T, D)
    h = hidden[torch.arange(ids.shape[0], device=ids.device), last_token(ids, base.pad_token_id)]    # (B, D)
    return base.score(h.to(base.score.weight.dtype) if not torch.is_autocast_enabled(h.device.type) else h).float()


def _batch_logits(model, batch, device):
    am, pos = batch["attention_mask"], batch["position_ids"]
    return logits(model, batch["input_ids"].to(device), None if am is None else am.to(device),
                  None if pos is None else pos.to(device))


def loss_sum(model, batch, device, cfg):
    """train.py's loss_sum for --task classify | reward: (sum of the rows' / pairs' losses, metric sums)."""
    z = _batch_logits(model, batch, device)                                     # (B, num_labels)
    if cfg.task == "reward":  # rows [0, P) chosen, [P, 2P) rejected (data.collate_pairs)
        p = batch["pairs"]
        r = z[:, 0]                                                             # (2P,)
        margin = r[:p] - r[p:]                                                  # (P,)
        return -F.logsigmoid(margin).sum(), {"accuracy": (margin > 0).float().sum().detach()}
    y = batch["class_labels"].to(device)                                        # (B,)
    return F.cross_entropy(z, y, reduction="sum"), {"accuracy": (z.argmax(-1) == y).float().sum().detach()}


def macro_f1(pred, y, k: int) -> float:
    """The mean over the k classes of F1 = 2 TP / (2 TP + FP + FN); a class absent from both y and pred is left
    out (as scikit-learn's f1_score(average="macro", labels=present classes))."""
    f1 = []
    for c in range(k):
        tp, fp, fn = (int(((pred == c) & (y == c)).sum()), int(((pred == c) & (y != c)).sum()),
                      int(((pred != c) & (y == c)).sum()))
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1) / max(len(f1), 1)


@torch.no_grad()
def evaluate(model, batches, cfg, device, precision: str, step: int, say: bool = True) -> dict:
    """eval_loss (mean over rows / pairs) and eval_accuracy (+ eval_macro_f1 for classify) over the eval set's
    collated batches, as train.py's metrics record of `step`; precision: the run's fp32 | bf16 | fp16 (autocast)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def amp():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    model.eval()
    total, n, preds, ys = 0.0, 0, [], []
    for b in batches:
        with amp():
            z = _batch_logits(model, b, device)
        if cfg.task == "reward":
            p = b["pairs"]
            total += float(-F.logsigmoid(z[:p, 0] - z[p:, 0]).sum())
            preds.append((z[:p, 0] > z[p:, 0]).long().cpu())
            ys.append(torch.ones(p, dtype=torch.long))
        else:
            total += float(F.cross_entropy(z, b["class_labels"].to(device), reduction="sum"))
            preds.append(z.argmax(-1).cpu())
            ys.append(b["class_labels"])
        n += len(preds[-1])
    model.train()
    pred, y = torch.cat(preds), torch.cat(ys)
    out = {"eval_loss": total / max(n, 1), "eval_accuracy": float((pred == y).float().mean())}
    if cfg.task == "classify":
        out["eval_macro_f1"] = macro_f1(pred, y, len(cfg.labels.split(",")))
    if say:
        print(f"step {step}: " + " ".join(f"{k.removeprefix('eval_').replace('_', '-')} {v:.4f}"
                                         for k, v in out.items()), flush=True)
    return {"step": step, **out}


def hf_config(model) -> dict:
    """config.json updates that make a saved model transformers' *ForSequenceClassification ({} without a head)."""
    if getattr(model, "score", None) is None:
        return {}
    arch = model.cfg.to_hf()["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")
    return {"architectures": [arch], "id2label": dict(enumerate(model.labels)),
            "label2id": {n: i for i, n in enumerate(model.labels)}, "pad_token_id": model.pad_token_id}


def save_pretrained(model, path):
    """model.save_pretrained, as transformers' *ForSequenceClassification when `model` has a head: config.json
    with its architecture, id2label / label2id and pad token; the weights without the (unused) LM head."""
    if getattr(model, "score", None) is None:
        return save(model, path)
    lm_head, model.lm_head = model.lm_head, None
    try:
        return save(model, path, config_updates=hf_config(model))
    finally:
        model.lm_head = lm_head


def load(path, dtype=torch.float32, device="cpu", num_labels: int | None = None) -> Transformer:
    """A transformers *ForSequenceClassification directory (score.weight, id2label) -> Transformer with its head;
    any other model (a causal LM dir or .gguf) gets a fresh head of num_labels (HF's from_pretrained into a
    classification class does the same)."""
    from .io import load_pretrained
    path = Path(path)
    files = _weight_files(path) if path.is_dir() else []
    shapes = {k: v for f in files for k, v in stored_shapes(f).items()}
    if "score.weight" not in shapes:
        if not num_labels:
            raise CheckpointError(f"{path}: no score.weight (not a sequence classification model): give num_labels")
        model = load_pretrained(path, dtype, device)
        return attach(model, num_labels, model.cfg.pad_token_id)
    cfg = read_config(path)
    check_layers(cfg.num_hidden_layers, shapes, path / "config.json")
    n = shapes["score.weight"][0]
    id2label = cfg.hf.get("id2label") or {}
    labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]
    with meta_device():
        model = attach(Transformer(cfg), n, cfg.pad_token_id, labels)
        if not cfg.tie_word_embeddings:  # transformers' classifier has no LM head: nothing to load into it
            model.lm_head = None
    sd = {k: v for f in files for k, v in read_safetensors(f, dtype, device).items()}
    load_state_dict_into(model, sd, str(path))
    return model.eval()
