"""CPU reference for bench/bench_zero3_frozen.py: the same LoRA step on the same random llama with HF
transformers + PEFT sharded by torch FSDP2 (`fully_shard` per decoder layer, then the root), gloo, 1 thread per
rank, world sizes 1, 2, 4; per-rank RSS after the step and peak RSS (ru_maxrss, the load included).

    python bench/bench_zero3_frozen.py ... prints the model dir it used; then
    python bench/bench_fsdp_reference.py --model DIR [--worlds 1 2 4] [--load whole|rank0]
--load whole: `from_pretrained` on every rank (HF's default; the peak holds the whole model on every rank);
--load rank0: meta-device model on every rank, fully_shard, then rank 0 reads the full state dict and
`set_model_state_dict(..., broadcast_from_rank0=True)` sends each rank its shards (FSDP2's memory-lean load:
rank 0 still holds the whole model). Runs outside the repo (`cwd` = a temp dir) because nanotune's `peft/`
shadows HF's. Dev-only: needs transformers and peft (requirements-dev.txt), nothing of nanotune.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r'''
import json, os, resource, sys, time
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoConfig, AutoModelForCausalLM
from peft import LoraConfig, get_peft_model

model_dir, out, load = sys.argv[1], sys.argv[2], sys.argv[3]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
if load == "whole":
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora)
else:
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir),
                                                                dtype=torch.float32), lora)
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
if load == "rank0":
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from safetensors.torch import load_file
    model.to_empty(device="cpu")
    sd = {}
    if rank == 0:
        base = load_file(os.path.join(model_dir, "model.safetensors"))
        sd = {k: v for k, v in model.state_dict().items()}  # names as PEFT wraps them
        for k in list(sd):
            src = k.replace("base_model.model.", "", 1).replace(".base_layer", "")
            if src in base:
                sd[k] = base[src]
            else:  # LoRA A/B: PEFT's init, drawn here on rank 0
                assert "lora_" in k, f"{k}: not in {model_dir}"
                t = torch.empty(sd[k].shape)
                torch.nn.init.kaiming_uniform_(t, a=5 ** 0.5) if "lora_A" in k else torch.nn.init.zeros_(t)
                sd[k] = t
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del sd
    model.base_model.model.model.rotary_emb.__init__(model.config)  # buffers left empty by to_empty
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(rank))
t0 = time.time()
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
opt.step()
with open("/proc/self/status") as f:
    rss = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
rec = {"rank": rank, "rss": rss, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
       "step_s": time.time() - t0, "loss": loss.item()}
every = [None] * world
dist.all_gather_object(every, rec)
if rank == 0:
    open(out, "w").write(json.dumps(every))
dist.destroy_process_group()
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--load", choices=["whole", "rank0"], default="whole")
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="bench_fsdp_"))
    (d / "worker.py").write_text(WORKER)
    print(f"HF + PEFT LoRA r=16 all-linear, FSDP2 fully_shard per layer, gloo, load {a.load}, {a.model}; "
          f"load average {os.getloadavg()}\n")
    print("| FSDP2 load | world | RSS after step 1 MB/rank | peak RSS MB/rank | peak / 1-rank peak | step s | "
          "loss (rank 0) |")
    print("|---|---|---|---|---|---|---|")
    one = None
    for world in a.worlds:
        out = d / f"w{world}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(29700 + world), str(d / "worker.py"), str(a.model.resolve()), str(out), a.load]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=d, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if r.returncode != 0:
            last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
            print(f"| {a.load} | {world} | failed: {last} | | | | |")
            print(r.stderr[-3000:], file=sys.stderr)
            continue
        recs = json.loads(out.read_text())
        peak = max(x["peak"] for x in recs)
        one = one or peak
        mb = lambda key: "/".join(f"{x[key] / 1e6:.0f}" for x in recs)  # noqa: E731
        print(f"| {a.load} | {world} | {mb('rss')} | {mb('peak')} | {peak / one:.2f}x | "
              f"{max(x['step_s'] for x in recs):.0f} | {recs[0]['loss']:.4f} |", flush=True)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
