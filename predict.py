"""Label texts with a sequence classification or reward model (model/classify.py): a transformers
*ForSequenceClassification directory (ours or theirs), or a base model + a PEFT adapter holding the head
(task_type SEQ_CLS, e.g. train.py --task classify's adapter/). One JSON line per text: the label and every label's
probability (classify), or the score (reward, num_labels = 1).

    python predict.py --model runs/cls/model --text "A warm, funny film." --text "Dull and far too long."
    python predict.py --model BASE_DIR --adapter runs/cls/adapter --text "..."
    python predict.py --model BASE_DIR --adapter runs/cls/adapter --data heldout.jsonl   # accuracy, macro-F1
    python predict.py --model BASE_DIR --labels negative,positive --data heldout.jsonl   # a fresh head (at init)

--data scores a labelled file ({"text", "label"}, any format data/ reads) and prints accuracy and macro-F1; with
--labels and a causal LM as --model the head is new, initialised as training initialises it (normal(0, 0.02),
--seed): the "before training" figure.
"""
import argparse
import json
import sys
from pathlib import Path

import types

import torch

import peft
from data.classify import batches, encode, read_labelled
from data.datasets import Source
from data.records import ReadOptions
from data.sources import expand
from model import classify, load_tokenizer
from model.io import stored_shapes


def load(model_dir, adapter: str = "", labels: list[str] | None = None):
    """The model with its head: the classification dir, or the base + the adapter (the head's size from the
    adapter's score.weight, its label names and pad token from head.json beside it)."""
    if not adapter:
        model = classify.load(model_dir, num_labels=len(labels) if labels else None)
        if labels and model.labels != labels:  # a fresh head's names (a classifier keeps its own)
            model.labels = labels
        return model
    wfile, hfile = Path(adapter) / peft.WEIGHTS_FILE, Path(adapter) / "head.json"
    head = next((s for k, s in (stored_shapes(wfile) if wfile.is_file() else {}).items()
                 if k.endswith(".score.weight")), None)
    if head is None:
        raise ValueError(f"{adapter}: no score.weight in {peft.WEIGHTS_FILE} (not a classification adapter)")
    model = classify.load(model_dir, num_labels=head[0])
    if hfile.is_file():
        meta = json.loads(hfile.read_text())
        model.labels, model.pad_token_id = meta["labels"], meta["pad_token_id"]
    return peft.load_adapter(model, adapter)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a *ForSequenceClassification dir, or the base of --adapter")
    ap.add_argument("--adapter", default="", help="a PEFT adapter dir with the head (task_type SEQ_CLS)")
    ap.add_argument("--text", action="append", default=[], help="a text to label (repeatable)")
    ap.add_argument("--data", default="", help="a labelled file: print accuracy and macro-F1 over it")
    ap.add_argument("--labels", default="", help="a causal LM as --model: a fresh head with these labels")
    ap.add_argument("--seed", type=int, default=0, help="the fresh head's init")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    a = ap.parse_args(argv)
    if not a.text and not a.data:
        sys.exit("error: give --text and/or --data")
    torch.manual_seed(a.seed)
    try:
        tok = load_tokenizer(a.model)
        model = load(a.model, a.adapter, a.labels.split(",") if a.labels else None).eval()
        base = peft.unwrap(model)
        if base.pad_token_id is None:  # the pooling skips the token batches are padded with
            base.pad_token_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
        if a.data:
            recs = read_labelled(Source(a.data, expand([a.data]), ReadOptions()), {"bad": 0})
            exs, _ = encode(tok, recs, base.labels, a.seq_len, True)
    except (ValueError, OSError, KeyError) as e:  # data.DataError is a ValueError
        sys.exit(f"error: {e}")
    if a.data:
        run = types.SimpleNamespace(task="classify", labels=",".join(base.labels))
        m = classify.evaluate(model, batches(exs, a.batch_size, base.pad_token_id), run, torch.device("cpu"),
                              "fp32", 0, say=False)
        print(json.dumps({"data": a.data, "examples": len(exs), "accuracy": round(m["eval_accuracy"], 4),
                          "macro_f1": round(m["eval_macro_f1"], 4), "loss": round(m["eval_loss"], 4)}), flush=True)
    out = []
    for text in a.text:
        with torch.no_grad():
            z = classify.logits(model, torch.tensor([tok.encode(text)]))[0]    # (num_labels,)
        if len(z) == 1:
            out.append({"text": text, "score": round(float(z[0]), 6)})
        else:
            p = z.softmax(-1)
            out.append({"text": text, "label": base.labels[int(p.argmax())],
                        "probabilities": {n: round(float(q), 6) for n, q in zip(base.labels, p)}})
        print(json.dumps(out[-1]), flush=True)
    return out


if __name__ == "__main__":
    main()
