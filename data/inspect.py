"""Show what the model will be trained on: rendered examples with the trained tokens marked, and statistics.

    python -m data.inspect --model DIR|FILE.gguf --data FILE[,FILE...] [-n 3] [--seq-len 2048] [--template NAME]
                           [--stage sft|dpo|kto] [--quiet]
(--stage dpo: each pair's chosen and rejected rows; kto: each completion with its label)

Trained tokens are printed between ⟦ and ⟧ (and in green on a terminal); everything else gets label -100.
"""
import argparse
import sys

import numpy as np

from model import load_tokenizer
from model.progress import quiet

from .batches import load_examples
from .datasets import columns
from .pairs import load_preference
from .records import DataError, ReadOptions


def render(tok, ex, color: bool) -> str:
    """The example's text with trained runs wrapped in markers."""
    out, i, n = [], 0, len(ex.ids)
    while i < n:
        j = i
        while j < n and ex.train[j] == ex.train[i]:
            j += 1
        text = tok.decode(ex.ids[i:j].tolist(), skip_special_tokens=False)
        if ex.train[i]:
            text = f"\033[32m⟦{text}⟧\033[0m" if color else f"⟦{text}⟧"
        out.append(text)
        i = j
    return "".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("-n", type=int, default=3, help="examples to print")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--template", default=None)
    ap.add_argument("--train-on-prompt", action="store_true")
    ap.add_argument("--skip-bad-records", action="store_true")
    ap.add_argument("--stage", default="sft", choices=("sft", "dpo", "kto"))
    ap.add_argument("--quiet", action="store_true", help="no progress lines while tokenising")
    # the data flags of train.py (docs/train.md)
    ap.add_argument("--system", default="", help="system message for chats without one")
    ap.add_argument("--strict-data", action="store_true", help="data warnings are errors")
    ap.add_argument("--text-split", default="blank", choices=("blank", "lines", "file"))
    ap.add_argument("--truncation", default="auto", choices=("auto", "keep-start", "keep-end", "drop"))
    ap.add_argument("--columns", default="", help="OURS=THEIRS,... field renames")
    ap.add_argument("--max-samples", type=int, default=0, help="records per file (0: all)")
    a = ap.parse_args(argv)
    quiet(a.quiet)
    try:
        tok = load_tokenizer(a.model)
        opts = ReadOptions(a.skip_bad_records, a.strict_data, a.text_split, a.system, a.max_samples, columns(a.columns))
        if a.stage != "sft":
            return inspect_preference(a, tok, opts)
        exs, st = load_examples(tok, a.data.split(","), a.seq_len, a.template, a.train_on_prompt, opts=opts,
                                truncation=a.truncation)
    except (DataError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    color = sys.stdout.isatty()
    for k, ex in enumerate(exs[:a.n]):
        print(f"--- example {k} ({len(ex.ids)} tokens, {int(ex.train[1:].sum())} trained"
              f"{', truncated' if ex.truncated else ''}) ---")
        print(render(tok, ex, color))
    lens = np.array([len(e.ids) for e in exs])
    pct = np.percentile(lens, [0, 50, 90, 99, 100]).astype(int) if len(lens) else [0] * 5
    print(f"--- {st['records']} records, {st['examples']} examples, {st['bad']} bad skipped, "
          f"{st['truncated']} truncated to {a.seq_len}, {st['no_target']} without trained tokens (dropped)")
    print(f"length (tokens): min {pct[0]}  p50 {pct[1]}  p90 {pct[2]}  p99 {pct[3]}  max {pct[4]}")
    print(f"tokens: {st['tokens']}, trained: {st['trained_tokens']} "
          f"({100 * st['trained_tokens'] / max(st['tokens'], 1):.1f}%)")


def inspect_preference(a, tok, opts):
    """--stage dpo|kto: the pairs (chosen, then rejected) or labelled completions, trained tokens marked."""
    try:
        items, st = load_preference(tok, a.data.split(","), a.stage, a.seq_len, a.template, opts=opts)
    except (DataError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    color = sys.stdout.isatty()
    for k, it in enumerate(items[:a.n]):
        rows = [("chosen", it.chosen), ("rejected", it.rejected)] if a.stage == "dpo" else \
            [("desirable" if it.desirable else "undesirable", it.example)]
        for name, ex in rows:
            print(f"--- {k} {name} ({len(ex.ids)} tokens, {int(ex.train[1:].sum())} trained"
                  f"{', truncated' if ex.truncated else ''}) ---")
            print(render(tok, ex, color))
    print(f"--- {st['records']} records, {st['examples']} {'pairs' if a.stage == 'dpo' else 'examples'}, "
          f"{st['bad']} bad skipped, {st['truncated']} truncated to {a.seq_len}, {st['prompt_truncated']} whose "
          "completion starts past --seq-len (dropped)")


if __name__ == "__main__":
    main()
