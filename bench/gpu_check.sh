#!/usr/bin/env bash
# The GPU checks for a lent H100/H200, in ONE device call (<= 7 minutes on an H200) from the repo root:
#   run(command="bash bench/gpu_check.sh", timeout_s=480, carry=[".whl"])   (.whl/: a bitsandbytes wheel, git-excluded)
# Every section runs whatever the one before did (set +e per section); each one's exit status is reported at the
# end, and the output is tee'd to $OUT/gpu_check.md (copy the tables into bench/RESULTS.md with the card's name).
#   1. env facts: GPU, driver, torch / CUDA / nvcc versions
#   2. tests/test_quant_cuda.py: our NF4 kernel builds (nvcc) and is bit-exact with the torch path
#   3. bench/gpu_smoke.py: the SDPA backend our shapes get, packed varlen vs the exact loop, train.py (full, lora,
#      qlora, --pack, --zero 2 --offload, a one-rank NCCL group) and generate.py on a tiny model with the host
#      syncs counted (torch.cuda.set_sync_debug_mode("warn"))
#   4. bench/gpu_check.py: NF4 bit-exact table, dequant GB/s vs copy and vs bitsandbytes, QLoRA ~1.1B vs
#      HF + PEFT + bitsandbytes
#   5. bench/gpu_dist.py: ZeRO-2 full FT of a ~2.7B llama (12 layers) under a GPU memory cap, without / with offload
# Dry run on a CPU: bash bench/gpu_check.sh --smoke-cpu (tiny model: sections 1-4 on the CPU with the CUDA-only
# parts skipped (no nvidia-smi / nvcc; test_quant_cuda.py's tests skip), section 5 skipped: it needs CUDA; CPU time
# limits, since a shared 2-core machine runs the six tiny train.py runs in minutes).
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUTDIR="${OUT:-/tmp}"
LOG="$OUTDIR/gpu_check.md"
: > "$LOG"
CPU=0; [ "${1:-}" = "--smoke-cpu" ] && CPU=1
status=()
section() {  # section NAME TIMEOUT_S COMMAND...: runs it, tees its output, records its exit status; never stops
    local name=$1 limit=$2; shift 2
    echo -e "\n## $name\n" | tee -a "$LOG"
    set +e
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    status+=("$name: exit $rc")
}
if [ $CPU = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (bitsandbytes): /work/.library/device/README.md
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
env_facts() {
    (command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader) \
        || echo "no nvidia-smi on PATH"
    python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
    (command -v nvcc >/dev/null && nvcc --version | tail -1) || echo "no nvcc on PATH"
    python3 -P -c "import bitsandbytes, transformers, peft; print('bitsandbytes', bitsandbytes.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tail -1
}
if [ $CPU = 1 ]; then
    section "environment (CPU dry run)" 60 bash -c "$(declare -f env_facts); env_facts"
    section "tests/test_quant_cuda.py (CPU dry run: skips without CUDA)" 300 python3 -m pytest -q -p no:cacheprovider tests/test_quant_cuda.py
    section "smoke (CPU dry run)" 1500 python3 bench/gpu_smoke.py --cpu
    section "QLoRA section (CPU dry run)" 600 python3 bench/gpu_check.py --smoke-cpu
    echo "(bench/gpu_dist.py: skipped on the CPU, it needs CUDA)" | tee -a "$LOG"
else
    section "environment" 20 bash -c "$(declare -f env_facts); env_facts"
    section "tests/test_quant_cuda.py" 60 python3 -m pytest -q -p no:cacheprovider tests/test_quant_cuda.py
    section "smoke: SDPA backends, packed attention, train.py / generate.py with sync counts" 100 python3 bench/gpu_smoke.py
    section "NF4 kernel and QLoRA vs HF + PEFT + bitsandbytes" 140 python3 bench/gpu_check.py
    section "ZeRO-2 offload under a GPU memory cap" 80 python3 bench/gpu_dist.py --layers 12 --steps 3 --mem-fraction 0.3
fi
if [ $CPU = 0 ]; then  # issue 12: ZeRO-3 LoRA + QLoRA, one NCCL rank, random ~8B llama (max_memory_allocated)
    section "ZeRO-3 LoRA and QLoRA step, 1 NCCL rank, random 8B llama" 300 python3 bench/gpu_zero3.py
fi
if [ $CPU = 0 ]; then  # issue 15: LoRA on our LLM.int8 base vs LoRA fp32 vs HF + PEFT + bitsandbytes 8-bit (GPU)
    section "LLM.int8 LoRA vs HF + PEFT + bitsandbytes 8-bit" 150 python3 bench/bench_int8.py --device cuda --rounds 1 --batch 8
fi
echo -e "\n## exit statuses\n" | tee -a "$LOG"
fail=0
for s in "${status[@]}"; do echo "- $s" | tee -a "$LOG"; [[ "$s" == *"exit 0" ]] || fail=1; done
exit $fail
