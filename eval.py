"""Multiple-choice benchmark evaluation by log-likelihood (MMLU / ARC / HellaSwag style), as lm-eval-harness does.

    python eval.py --model DIR [--adapter DIR] [--int8] --tasks FILE[,FILE...] [--shots K] [--out FILE.json]

A task file is JSONL, one {"question": str, "choices": [str, ...], "answer": int} per line; the k-shot examples
are the first K records of its dev split, `<name>.dev.jsonl` beside it (lm-eval's first_n sampler). Each
question's context is
    Question: <dev q>\\nAnswer: <dev answer>\\n\\n ... Question: <q>\\nAnswer:
and each choice c is scored by the summed log-probability of " c" given the context:
    ll(c) = sum_t log p(cont_t | context, cont_<t),   acc = [argmax_c ll(c) == answer],
    acc_norm = [argmax_c ll(c) / len(c) == answer]            (len in characters, as lm-eval's acc_norm).
Tokens as lm-eval's HF backend: context and context + " " + choice encoded with the tokenizer's defaults, the
continuation being the tail of the second after len(context tokens) (tests/test_eval.py checks all of it against
lm-eval-harness). Speed: the tokens every context of a task starts with (the k-shot examples) run once into a KV
cache; each question is one row [context | choice 1 | choice 2 ...] under a tree mask (each choice sees the context
and its own tokens), so its context runs once for all its choices; many questions per forward; the LM head only at
the scored positions.
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
        if not isinstance(r, dict):
            raise TaskError(f"{where}: expected a JSON object with \"question\", \"choices\", \"answer\"")
        for key in ("question", "choices", "answer"):
            if key not in r:
                raise TaskError(f"{where}: missing key \"{key}\"")
        if not isinstance(r["question"], str):
            raise TaskError(f"{where}: \"question\" must be a string")
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
    files = str(files).split(",") if isinstance(files, (str, Path)) else files
    for f in [Path(f) for f in files if str(f)]:
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


def encode_pair(tok, ctx: str, choices: list[str], max_len: int) -> tuple[list[int], list[list[int]]]:
    """lm-eval's HF tokenisation: context and context + " " + choice encoded with the tokenizer's defaults (its
    add_special_tokens=True: a BOS where the tokenizer adds one), the continuation being the tail of the second
    after len(context tokens). The context is left-truncated so the longest choice fits max_len + 1 tokens (lm-eval
    truncates per choice: shorter choices would keep more context there; only for contexts near max_len)."""
    ctx_ids = tok.encode(ctx)
    conts = [tok.encode(ctx + " " + c)[len(ctx_ids):] for c in choices]
    if any(not c for c in conts):
        raise TaskError(f"a choice of {choices!r} encodes to no tokens after its context")
    keep = max_len + 1 - max(len(c) for c in conts)
    if keep < 1:
        raise TaskError(f"a choice of {choices!r} is longer than the model's {max_len} positions")
    return ctx_ids[-keep:] if len(ctx_ids) > keep else ctx_ids, conts


def pack(ctx_ids: list[int], conts: list[list[int]], window: int | None) -> list[dict]:
    """One question -> rows of [context | choice 1 | choice 2 ...] (a prefix tree, as in SpecInfer's tree
    attention): every choice sees the whole context and its own earlier tokens only, at positions C, C+1, ...
    so the context is computed once for all choices. A row holds each choice's tokens but its last (nothing is
    predicted after it); score positions: the last context token predicts cont[0], cont[t-1]'s predicts cont[t].
    A sliding window counts row offsets (build_mask), so a row longer than the window holds one choice."""
    C = len(ctx_ids)
    packed = C + sum(len(c) - 1 for c in conts)
    groups = [list(range(len(conts)))] if window is None or packed <= window else [[i] for i in range(len(conts))]
    rows = []
    for g in groups:
        ids, pos, seg, where, tgt, owner = list(ctx_ids), list(range(C)), [-1] * C, [], [], []
        for i in g:
            c = conts[i]
            where += [C - 1] + list(range(len(ids), len(ids) + len(c) - 1))
            ids += c[:-1]
            pos += list(range(C, C + len(c) - 1))
            seg += [i] * (len(c) - 1)
            tgt += c
            owner += [i] * len(c)
        rows.append({"ids": ids, "pos": pos, "seg": seg, "where": where, "tgt": tgt, "owner": owner})
    return rows


def common_prefix(rows: list[dict]) -> int:
    """How many leading tokens every row shares (the k-shot examples, "Question:"), keeping each row's last
    context token out of it (it predicts the first choice token)."""
    first, n = rows[0]["ids"], min(r["where"][0] for r in rows)
    for r in rows:
        n = next((i for i in range(n) if r["ids"][i] != first[i]), n)
    return n


@torch.no_grad()
def prefix_cache(model, ids: list[int]) -> KVCache | None:
    """The KV cache of the tokens every question starts with, computed once per task."""
    if not ids:
        return None
    cache = KVCache(model.cfg.num_hidden_layers)
    model(torch.tensor([ids], device=model.device), cache=cache, hidden_only=True)
    return cache


@torch.no_grad()
def score_rows(model, rows: list[dict], prefix: KVCache | None, P: int) -> list[torch.Tensor]:
    """Per row, the summed log-likelihood of each choice it holds (indexed by choice). One forward for the batch:
    rows (their tokens after the shared P-token prefix, whose cached keys/values every row sees) right-padded,
    a (B, 1, T, P + T) tree mask, the LM head only at the scored positions."""
    B, T = len(rows), max(len(r["ids"]) for r in rows) - P
    ids, pos = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -2)                         # -1 context, i choice i, -2 padding
    for b, r in enumerate(rows):
        n = len(r["ids"]) - P
        ids[b, :n], pos[b, :n] = torch.tensor(r["ids"][P:]), torch.tensor(r["pos"][P:])
        seg[b, :n] = torch.tensor(r["seg"][P:])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    # query t sees key s <= t of the context or of its own choice (pads, last in a row, are seen by no real token)
    mask = causal & ((seg[:, None, :] == -1) | (seg[:, :, None] == seg[:, None, :]))      # (B, T, T)
    mask = torch.cat([mask.new_ones(B, T, P), mask], dim=-1)[:, None]                      # (B, 1, T, P + T)
    cache = None
    if prefix is not None:  # the prefix's keys/values, shared by the B rows (expand: no copy until the concat)
        cache = KVCache(model.cfg.num_hidden_layers)
        cache.k = [k.expand(B, -1, -1, -1) for k in prefix.k]
        cache.v = [v.expand(B, -1, -1, -1) for v in prefix.v]
    dev = model.device
    h = model(ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), cache=cache,
              hidden_only=True)                                                             # (B, T, D)
    flat = torch.cat([torch.tensor(r["where"]) - P + b * T for b, r in enumerate(rows)])   # (N,)
    logp = torch.log_softmax(model.lm_head(h.reshape(B * T, -1)[flat.to(dev)]).float(), -1)  # (N, V)
    tgt = torch.tensor([t for r in rows for t in r["tgt"]], device=dev)
    ll = logp.gather(1, tgt[:, None])[:, 0].cpu()                                           # (N,)
    out, k = [], 0
    for r in rows:
        n = len(r["tgt"])
        owner = torch.tensor(r["owner"])
        out.append(torch.zeros(int(owner.max()) + 1, dtype=torch.float64).index_add_(0, owner, ll[k:k + n].double()))
        k += n
    return out


def loglikelihoods(model, tok, questions: list[tuple[str, list[str]]], batch_tokens: int = 2048,
                   desc: str = "eval") -> list[list[float]]:
    """Summed log p(" choice" | context) for every (context, choices) question. The tokens all contexts start
    with run once (a KV cache); the rest in batches of about batch_tokens (B x longest row) tokens: many
    questions per forward, so the matmuls are large enough to be efficient."""
    cfg = model.cfg
    rows, owners = [], []                                # owners: the question of each row
    for q, (ctx, choices) in enumerate(questions):
        ctx_ids, conts = encode_pair(tok, ctx, choices, cfg.max_position_embeddings)
        for r in pack(ctx_ids, conts, cfg.sliding_window):
            rows.append(r)
            owners.append(q)
    P = common_prefix(rows)
    prefix = prefix_cache(model, rows[0]["ids"][:P])
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["ids"]))  # similar lengths together: less padding
    out = [[0.0] * len(c) for _, c in questions]
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * (len(rows[cur[0]]["ids"]) - P) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches += [cur] if cur else []
    for batch in progress(batches, desc, unit="batch", leave=False):
        for i, lls in zip(batch, score_rows(model, [rows[i] for i in batch], prefix, P)):
            for c in set(rows[i]["owner"]):
                out[owners[i]][c] = float(lls[c])
    return out


def score_tasks(model, tok, tasks: dict, per_choice: bool = False) -> dict:
    """{"<task>/acc", "<task>/acc_norm", ..., "overall/acc", "overall/acc_norm"} (overall: over all questions);
    per_choice adds "<task>/logliks" (one list per question)."""
    was = model.training
    model.eval()
    out, hits, norm_hits, n_all = {}, 0, 0, 0
    for name, t in tasks.items():
        lls_all, acc, acc_norm = [], 0, 0
        questions = [(context(r, t["shots"]), r["choices"]) for r in t["records"]]
        for r, lls in zip(t["records"], loglikelihoods(model, tok, questions, desc=f"eval {name}")):
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
