"""Bench: prompt tuning, P-tuning, prefix tuning, LLaMA-Adapter on SmolLM2-135M, nanotune vs HF PEFT.

CPU, fp32, B8 x T128 random tokens, the first half of each row label-masked (-100), AdamW; median step time over
the timed steps, trainable params and %, peak RSS. Each (method, stack) runs in its own process so that peak RSS is
its own; HF PEFT runs as `python -P` outside the repo (our `peft/` shadows HF's).

    python bench/bench_peft_prompt.py            # prints a markdown table
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile

# method -> (our config expression, HF PEFT config expression)
METHODS = {
    "prompt tuning (n=20)": ("PromptConfig(num_virtual_tokens=20)",
                             "PromptTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=20)"),
    "P-tuning MLP (n=20)": ("PTuningConfig(num_virtual_tokens=20)",
                            "PromptEncoderConfig(task_type='CAUSAL_LM', num_virtual_tokens=20)"),
    "prefix tuning (n=20)": ("PrefixConfig(num_virtual_tokens=20)",
                             "PrefixTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=20)"),
    "LLaMA-Adapter (len=10, 30 layers)": ("LlamaAdapterConfig(adapter_len=10, adapter_layers=30)",
                                          "AdaptionPromptConfig(task_type='CAUSAL_LM', adapter_len=10, "
                                          "adapter_layers=30)"),
}
B, T, WARMUP, STEPS = 8, 128, 1, 4

COMMON = f"""
import json, resource, statistics, time, torch
torch.manual_seed(0)
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 49152, ({B}, {T}), generator=g)
labels = ids.clone()
labels[:, :{T} // 2] = -100
def run(step, params):
    opt = torch.optim.AdamW(params, lr=1e-3)
    times = []
    for i in range({WARMUP + STEPS}):
        t0 = time.perf_counter()
        loss = step()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[{WARMUP}:]), loss.item()
"""

OURS = COMMON + """
import sys
sys.path.insert(0, ".")
import model, model.gguf, peft
from peft import PromptConfig, PTuningConfig, PrefixConfig, LlamaAdapterConfig
m = peft.apply(model.load_pretrained(model.gguf.default_model()).train(), {cfg})
def step():
    logits = m(ids)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
params = [p for p in m.parameters() if p.requires_grad]
t, loss = run(step, params)
n, total = sum(p.numel() for p in params), sum(p.numel() for p in m.parameters())
"""

HF = COMMON + """
from transformers import AutoModelForCausalLM
from peft import get_peft_model, PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig, AdaptionPromptConfig
m = get_peft_model(AutoModelForCausalLM.from_pretrained("{path}", dtype=torch.float32), {cfg}).train()
step = lambda: m(input_ids=ids, labels=labels).loss
t, loss = run(step, [p for p in m.parameters() if p.requires_grad])
n, total = m.get_nb_trainable_parameters()
"""

REPORT = """
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
print("RESULT " + json.dumps({"step_s": t, "loss": loss, "trainable": n, "total": total, "rss_gb": rss}))
"""


def child(code: str, cwd: str, isolated: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable] + (["-P"] if isolated else []) + ["-c", code + REPORT]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        raise RuntimeError(f"bench child failed:\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    return f"{cpu}, {os.cpu_count()} cores, 2 torch threads, torch {torch.__version__}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)
    from model.gguf import default_model
    path = str(default_model())
    rows = []
    with tempfile.TemporaryDirectory() as outside:
        for name, (ours_cfg, hf_cfg) in METHODS.items():
            ours = child(OURS.format(cfg=ours_cfg), repo, isolated=False)
            hf = child(HF.format(cfg=hf_cfg, path=path), outside, isolated=True)
            rows.append((name, ours, hf))
            print(name, json.dumps(ours), json.dumps(hf), file=sys.stderr)
    print(f"SmolLM2-135M-Instruct, CPU fp32, B{B}xT{T} (first half of each row label-masked), AdamW, "
          f"median of {STEPS} steps after {WARMUP} warm-up; {machine()}\n")
    print("| method | trainable params (%) | nanotune step s | HF PEFT step s | speed-up | nanotune peak RSS GB "
          "| HF PEFT peak RSS GB | PEFT trainable |")
    print("|---|---|---|---|---|---|---|---|")
    for name, o, h in rows:
        print(f"| {name} | {o['trainable']:,} ({100 * o['trainable'] / o['total']:.3f}%) | {o['step_s']:.2f} "
              f"| {h['step_s']:.2f} | {h['step_s'] / o['step_s']:.2f}x | {o['rss_gb']:.2f} | {h['rss_gb']:.2f} "
              f"| {h['trainable']:,} |")


if __name__ == "__main__":
    main()
