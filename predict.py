"""Label texts with a sequence classification or reward model (model/classify.py): a transformers
*ForSequenceClassification directory (ours or theirs), or a base model + a PEFT adapter holding the head
(task_type SEQ_CLS, e.g. train.py --task classify's adapter/). One JSON line per text: the label and every label's
probability (classify), or the score (reward, num_labels = 1).

    python predict.py --model runs/cls/model --text "A warm, funny film." --text "Dull and far too long."
    python predict.py --model BASE_DIR --adapter runs/cls/adapter --text "..."
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import peft
from model import classify, load_tokenizer
from model.io import stored_shapes


def load(model_dir, adapter: str = ""):
    """The model with its head: the classification dir, or the base + the adapter (the head's size from the
    adapter's score.weight, its label names and pad token from head.json beside it)."""
    if not adapter:
        return classify.load(model_dir)
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
    ap.add_argument("--text", action="append", required=True, help="a text to label (repeatable)")
    a = ap.parse_args(argv)
    try:
        tok = load_tokenizer(a.model)
        model = load(a.model, a.adapter).eval()
    except (ValueError, OSError, KeyError) as e:
        sys.exit(f"error: {e}")
    base = peft.unwrap(model)
    if base.pad_token_id is None:  # one text at a time: the pad token only matters if the text holds it
        base.pad_token_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
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
