"""Multiple-choice benchmark evaluation by log-likelihood (MMLU / ARC / HellaSwag style), as lm-eval-harness does.

    python eval.py --model DIR [--adapter DIR] [--int8] --tasks FILE[,FILE...] [--shots K] [--out FILE.json]

A task file is JSONL, one {"question": str, "choices": [str, ...], "answer": int} per line; the k-shot examples
are the first K records of its dev split, `<name>.dev.jsonl` beside it (lm-eval's first_n sampler). Each
question's context is
    Question: <dev q>\\nAnswer: <dev answer>\\n\\n ... Question: <q>\\nAnswer:
and each choice c is scored by the summed log-probability of " c" given the context:
    ll(c) = sum_t log p(cont_t | context, cont_<t),   acc = [argmax_c ll(c) == answer],
    acc_norm = [argmax_c ll(c) / len(c) == answer]            (len in characters, as lm-eval's acc_norm).
Tokens as lm-eval's HF backend: context and context+continuation are encoded without special tokens and the
continuation is the tail of the second after len(context tokens). The context runs once; its KV cache is then
shared by all the choices, which run as one batch (right-padded; causal attention keeps pads out of the scores).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

import model as M
from model.model import KVCache
from model.progress import progress

TEXT = "Question: {question}\nAnswer:"  # lm-eval's MMLU-style doc_to_text; target delimiter " ", shots "\n\n"


class TaskError(ValueError):
    pass


def read_records(path) -> list[dict]:
    """A task JSONL -> records, each checked: a bad line is a one-line TaskError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(r, dict) or not isinstance(r.get("question"), str):
            raise TaskError(f"{where}: expected an object with a \"question\" string")
        ch, a = r.get("choices"), r.get("answer")
        if not isinstance(ch, list) or not all(isinstance(c, str) and c for c in ch):
            raise TaskError(f"{where}: \"choices\" must be a list of non-empty strings")
        if len(ch) < 2:
            raise TaskError(f"{where}: {len(ch)} choice(s); a multiple-choice question needs at least 2")
        if not isinstance(a, int) or isinstance(a, bool) or not 0 <= a < len(ch):
            raise TaskError(f"{where}: answer {a!r} is not a choice index 0..{len(ch) - 1}")
        out.append({"question": r["question"], "choices": ch, "answer": a})
    if not out:
        raise TaskError(f"{path}: no records")
    return out


def load_tasks(files, shots: int = 0) -> dict[str, dict]:
    """Task name (file stem) -> {"records", "shots": the first `shots` dev records}, all checked now."""
    tasks = {}
    for f in [Path(f) for f in (files.split(",") if isinstance(files, str) else files) if str(f)]:
        dev = f.with_name(f.name.removesuffix(".jsonl") + ".dev.jsonl")
        if shots and not dev.is_file():
            raise TaskError(f"{f}: --shots {shots} needs a dev split {dev}")
        fewshot = read_records(dev)[:shots] if shots else []
        if len(fewshot) < shots:
            raise TaskError(f"{dev}: {len(fewshot)} records, fewer than --shots {shots}")
        tasks[f.name.removesuffix(".jsonl")] = {"records": read_records(f), "shots": fewshot}
    return tasks


def context(rec: dict, shots: list[dict]) -> str:
    shown = [TEXT.format(**s) + " " + s["choices"][s["answer"]] for s in shots]
    return "".join(s + "\n\n" for s in shown) + TEXT.format(**rec)


@torch.no_grad()
def choice_logliks(model, tok, ctx: str, choices: list[str]) -> list[float]:
    """Summed log p(" choice" | ctx) per choice: the context once (KV cache), the choices as one batch."""
    ctx_ids = tok.encode(ctx, add_special_tokens=False)
    conts = [tok.encode(ctx + " " + c, add_special_tokens=False)[len(ctx_ids):] for c in choices]
    cache = KVCache(model.cfg.num_hidden_layers)
    first = torch.log_softmax(model(torch.tensor([ctx_ids]), cache=cache)[0, -1].float(), -1)  # (V,) p(cont_0)
    n, T = len(choices), max(len(c) for c in conts)
    cache.k = [k.expand(n, -1, -1, -1) for k in cache.k]   # one context, shared by every choice row
    cache.v = [v.expand(n, -1, -1, -1) for v in cache.v]
    lls = [float(first[c[0]]) for c in conts]
    if T > 1:
        x = torch.tensor([c[:-1] + [0] * (T - len(c)) for c in conts])                 # (n, T-1), right-padded
        logp = torch.log_softmax(model(x, cache=cache).float(), -1)                    # (n, T-1, V)
        for i, c in enumerate(conts):
            lls[i] += float(logp[i, torch.arange(len(c) - 1), torch.tensor(c[1:], dtype=torch.long)].sum())
    return lls


def score_tasks(model, tok, tasks: dict, per_choice: bool = False) -> dict:
    """{"<task>/acc", "<task>/acc_norm", ..., "overall/acc", "overall/acc_norm"} (overall: over all questions);
    per_choice adds "<task>/logliks" (one list per question)."""
    was = model.training
    model.eval()
    out, hits, norm_hits, n_all = {}, 0, 0, 0
    for name, t in tasks.items():
        lls_all, acc, acc_norm = [], 0, 0
        for r in progress(t["records"], f"eval {name}", unit="q", leave=False):
            lls = choice_logliks(model, tok, context(r, t["shots"]), r["choices"])
            normed = [ll / len(c) for ll, c in zip(lls, r["choices"])]
            acc += max(range(len(lls)), key=lls.__getitem__) == r["answer"]
            acc_norm += max(range(len(lls)), key=normed.__getitem__) == r["answer"]
            lls_all.append(lls)
        n = len(t["records"])
        out[f"{name}/acc"], out[f"{name}/acc_norm"] = acc / n, acc_norm / n
        if per_choice:
            out[f"{name}/logliks"] = lls_all
        hits, norm_hits, n_all = hits + acc, norm_hits + acc_norm, n_all + n
    out["overall/acc"], out["overall/acc_norm"] = hits / n_all, norm_hits / n_all
    model.train(was)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="HF dir or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", default="", help="a PEFT adapter dir (ours or HF PEFT's) on top of --model")
    ap.add_argument("--int8", action="store_true", help="load the base as LLM.int8 (quant/int8.py)")
    ap.add_argument("--tasks", required=True, help="task JSONL file(s), comma-separated")
    ap.add_argument("--shots", type=int, default=0, help="k-shot examples from each task's .dev.jsonl")
    ap.add_argument("--out", default="", help="write the metrics (and per-choice log-likelihoods) as JSON")
    a = ap.parse_args(argv)
    if a.shots < 0:
        sys.exit(f"error: --shots {a.shots}: expected >= 0")
    torch.set_grad_enabled(False)
    try:
        tasks = load_tasks(a.tasks, a.shots)  # every file checked before the model loads
        if not a.model:
            from model.gguf import default_model
            a.model = str(default_model())
        import peft
        from quant import int8
        model = int8.load_int8(a.model) if a.int8 else M.load_pretrained(a.model)
        model = peft.load_adapter(model, a.adapter) if a.adapter else model
        tok = M.load_tokenizer(a.model)
    except (TaskError, M.CheckpointError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    t0 = time.perf_counter()
    res = score_tasks(model, tok, tasks, per_choice=bool(a.out))
    dt = time.perf_counter() - t0
    n = sum(len(t["records"]) for t in tasks.values())
    print(f"| task | n | acc | acc_norm |\n|---|---|---|---|")
    for name, t in tasks.items():
        print(f"| {name} | {len(t['records'])} | {res[name + '/acc']:.4f} | {res[name + '/acc_norm']:.4f} |")
    print(f"| overall | {n} | {res['overall/acc']:.4f} | {res['overall/acc_norm']:.4f} |")
    print(f"{n} questions in {dt:.1f} s ({n / dt:.2f} questions/s), {a.shots}-shot")
    if a.out:
        Path(a.out).write_text(json.dumps({**res, "seconds": dt, "shots": a.shots}, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
