"""train.py's DPO step vs TRL's DPOTrainer: tokens/s and peak RSS on the same pairs.

    python bench/bench_dpo.py [--steps 3] [--warmup 1] [--rounds 2] [--pairs 4] [--model DIR]

SmolLM2-135M-Instruct, CPU fp32, LoRA r8 alpha16 on all linear layers, sigmoid DPO (beta 0.1), P pairs per step
(2P rows: chosen then rejected) of T128 tokens, the second half of each row the completion, the same token batches
for both. Both use the model with its adapter switched off as the reference (no copy). TRL's step is its own
compute_loss (its fused log-prob LM head) + backward + clip + AdamW; ours is train.train_step. Each side runs in
its own process (clean peak RSS; outside the repo, so HF's peft is importable), --rounds processes per side in
alternating order; step time is the median over every timed step, peak RSS the largest of a side's rounds.
tokens/s counts the policy's tokens (2P x T) per optimizer step.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T, R, ALPHA = 128, 8, 16
REPO = Path(__file__).resolve().parent.parent


def batch(pairs: int, vocab: int):
    """(2P, T) ids; completion = the second half of each row; rejected rows differ from chosen in it."""
    import torch
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (pairs, T // 2), generator=g)
    comp = torch.randint(0, vocab, (2 * pairs, T // 2), generator=g)
    ids = torch.cat([prompt.repeat(2, 1), comp], dim=1)
    mask = torch.zeros(2 * pairs, T, dtype=torch.bool)
    mask[:, T // 2:] = True
    return ids, mask


def worker_ours(model_dir, pairs, steps, warmup):
    import torch
    sys.path.insert(0, str(REPO))
    import train
    cfg = train.TrainConfig(model=model_dir, data="-", method="lora", stage="dpo", lr=1e-4, max_grad_norm=1.0,
                            method_args={"lora_r": R, "lora_alpha": ALPHA, "lora_targets": "all-linear"})
    device = torch.device("cpu")
    model = train.build_model(cfg, device)
    reference = train.preference.reference(model, device, disabled=train.peft.disabled)
    model.train()
    opt = train.make_optimizer(model, cfg)
    sched = train.make_scheduler(opt.optimizer, cfg, 1000)
    ids, mask = batch(pairs, model.cfg.vocab_size)
    mb = [{"input_ids": ids, "train_mask": mask, "attention_mask": None, "position_ids": None, "pairs": pairs}]
    times = []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        train.train_step(model, mb, opt, sched, cfg, device, reference)
        times.append(time.perf_counter() - t)
    return times[warmup:]


def worker_trl(model_dir, pairs, steps, warmup):
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0))
    ds = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    args = DPOConfig(output_dir=tempfile.mkdtemp(), beta=0.1, report_to=[], use_cpu=True, learning_rate=1e-4,
                     per_device_train_batch_size=pairs)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds,
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    m = trainer.model
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids, mask = batch(pairs, model.config.vocab_size)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask.long()}
    times = []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        trainer.compute_loss(m, b).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times[warmup:]


def run_worker(impl, model_dir, pairs, steps, warmup) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = ["--worker", impl, "--model", model_dir, "--pairs", str(pairs), "--steps", str(steps),
            "--warmup", str(warmup)]
    with tempfile.TemporaryDirectory() as cwd:  # outside the repo: HF's peft, not ours
        r = subprocess.run([sys.executable, "-P", str(Path(__file__).resolve()), *args], cwd=cwd, env=env,
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{impl} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per side, in alternating order")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--worker", default=None)
    a = ap.parse_args()
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    if a.worker:
        times = (worker_ours if a.worker == "ours" else worker_trl)(a.model, a.pairs, a.steps, a.warmup)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        print(json.dumps({"times": times, "peak_rss_gb": rss}))
        return
    if a.model is None:
        sys.path.insert(0, str(REPO))
        from model.gguf import default_model
        a.model = str(default_model())
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    print(f"machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}\n"
          f"model {a.model}, DPO sigmoid, LoRA r{R} a{ALPHA} all-linear, {a.pairs} pairs x 2 x T{T}, fp32, "
          f"median of {a.rounds} x {a.steps} steps after {a.warmup} warmup each\n")
    runs = {"trl": [], "ours": []}
    for rnd in range(a.rounds):
        for impl in ("trl", "ours") if rnd % 2 == 0 else ("ours", "trl"):
            runs[impl].append(run_worker(impl, a.model, a.pairs, a.steps, a.warmup))
    res = {impl: (statistics.median(t for r in rs for t in r["times"]), max(r["peak_rss_gb"] for r in rs))
           for impl, rs in runs.items()}
    print("| impl | tokens/s | speed-up | peak RSS GB | RSS ratio |")
    print("|---|---|---|---|---|")
    for impl, name in (("trl", "TRL DPOTrainer + PEFT"), ("ours", "nanotune")):
        step, rss = res[impl]
        print(f"| {name} | {2 * a.pairs * T / step:.0f} | {res['trl'][0] / step:.2f}x | {rss:.2f} | "
              f"{rss / res['trl'][1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
