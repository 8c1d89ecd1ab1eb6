"""Deployment on SmolLM2-135M-Instruct (fp32, greedy, the same prompts): generation tokens/s, prefill and decode
separately, of generate.py's path (model.sampling.generate), of serve.py (streamed over HTTP) and of
transformers' `generate`; serve.py's throughput with 1, 4 and 8 concurrent clients; GGUF file sizes per type
vs the source safetensors, with each type's logit error against fp32. One run; prints markdown tables.

    python bench/bench_serve.py [--tokens 48] [--threads 2]

Prefill = chat-templated prompt in, first token out (time to first token); decode = the other tokens / their time. The server
runs in its own process (one generation thread); transformers in this one (it needs no HF peft).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import model as M  # noqa: E402
from model.gguf import default_model  # noqa: E402
from export import TYPES, export  # noqa: E402
from model.sampling import generate  # noqa: E402

PROMPTS = ["Describe a cat in two sentences.", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
           "Give me three tips for learning to code."]


def rates(t0, stamps, n) -> tuple[float, float]:
    """(prefill s, decode tok/s) from the start time and the arrival time of each new token."""
    return stamps[0] - t0, (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else float("nan")


def ours(model, prompts, n, stop_ids):
    out = []
    for ids in prompts:
        stamps = []
        t0 = time.perf_counter()
        toks = generate(model, ids, n, stop_ids, on_token=lambda _: stamps.append(time.perf_counter()))
        out.append((*rates(t0, stamps, len(toks)), len(ids), toks))
    return out


def theirs(model_dir, prompts, n, stop_ids):
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):  # first call: the prompt; then one call per new token
            self.t.append(time.perf_counter())

        def end(self):
            pass
    m.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    out = []
    for ids in prompts:
        s = Stamps()
        t0 = time.perf_counter()
        g = m.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, streamer=s,
                       eos_token_id=sorted(stop_ids), pad_token_id=0)
        toks = [t for t in g[0, len(ids):].tolist() if t not in stop_ids]
        out.append((*rates(t0, s.t[1:], len(toks)), len(ids), toks))
    return out


def start_server(model_dir, threads):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--model", str(model_dir), "--port", str(port)],
                            cwd=REPO, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    import httpx
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(url + "/v1/models", timeout=1)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("serve.py did not start")


def served(url, name, text, n):
    """(prefill s, decode tok/s, completion tokens, latency s) of one streamed /v1/chat/completions request."""
    import httpx
    body = {"model": name, "messages": [{"role": "user", "content": text}], "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    stamps, used = [], 0
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                used = ev["usage"]["completion_tokens"]
            elif ev["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    return (*rates(t0, stamps, used), used, time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    src = default_model()
    tok = M.load_tokenizer(src)
    # the chat template's prompts (as the server renders them): the same ids and stop tokens on every side
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], True), add_special_tokens=False)
               for p in PROMPTS]
    model = M.load_pretrained(src)
    ours(model, prompts[:1], 4, tok.stop_ids)  # warm-up (allocator, kernels), as the server's below
    rows = {"generate.py (model.sampling.generate)": ours(model, prompts, a.tokens, tok.stop_ids),
            "transformers generate": theirs(src, prompts, a.tokens, tok.stop_ids)}
    print("ours vs transformers done", file=sys.stderr, flush=True)
    proc, url = start_server(src, a.threads)
    try:
        name = src.name
        served(url, name, PROMPTS[0], 4)  # warm-up
        rows["serve.py (HTTP, streamed)"] = [served(url, name, p, a.tokens)[:3] for p in PROMPTS]
        conc = {}
        for c in (1, 4, 8):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                res = list(pool.map(lambda i: served(url, name, PROMPTS[i % len(PROMPTS)], a.tokens), range(c)))
            wall = time.perf_counter() - t0
            conc[c] = (sum(r[2] for r in res) / wall, sum(r[3] for r in res) / c, wall)
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"SmolLM2-135M-Instruct fp32, greedy, {a.tokens} new tokens, {len(PROMPTS)} prompts "
          f"({min(map(len, prompts))}-{max(map(len, prompts))} tokens), torch {torch.__version__}, "
          f"{a.threads} threads\n")
    print("| implementation | prefill (ms, median) | decode tok/s (median) |\n|---|---|---|")
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    for k, r in rows.items():
        print(f"| {k} | {1000 * med([x[0] for x in r]):.0f} | {med([x[1] for x in r]):.1f} |")
    same = all(x[3] == y[3] for x, y in zip(rows["generate.py (model.sampling.generate)"],
                                            rows["transformers generate"]))
    print(f"\ngreedy tokens identical (ours vs transformers): {same}\n")
    print("| concurrent clients | server tokens/s (total) | mean latency per request (s) | wall (s) |\n|---|---|---|---|")
    for c, (tps, lat, wall) in conc.items():
        print(f"| {c} | {tps:.1f} | {lat:.2f} | {wall:.2f} |")
    print("\n| GGUF type | file MB | vs source safetensors | max abs logit error vs fp32 | top-1 agreement |")
    print("|---|---|---|---|---|")
    size = (src / "model.safetensors").stat().st_size
    ids = torch.tensor([sum(prompts, [])])
    with torch.no_grad():
        full = model(ids)[0]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in TYPES:
            f = export(src, Path(tmp) / f"{kind}.gguf", kind)
            with torch.no_grad():
                got = M.load_pretrained(f)(ids)[0]
            agree = (got.argmax(-1) == full.argmax(-1)).float().mean().item()
            print(f"| {kind} | {f.stat().st_size / 2**20:.1f} | {f.stat().st_size / size:.3f} | "
                  f"{(got - full).abs().max().item():.3g} | {100 * agree:.1f}% |")
            f.unlink()
    print(f"\nsource: {src / 'model.safetensors'} ({size / 2**20:.1f} MB, fp32)")


if __name__ == "__main__":
    main()
