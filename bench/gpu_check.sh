#!/usr/bin/env bash
# quant/ GPU checks for a lent H100/H200, in ONE device call from the repo root:
#   run(command="bash bench/gpu_check.sh", timeout_s=480)            (add carry=[".whl"] with a bitsandbytes wheel)
# 1. tests/test_quant_cuda.py: our kernel builds with nvcc and is bit-exact with the torch path (poisoned output)
# 2. bench/gpu_check.py: bit-exact table on fresh inputs, GB/s vs device copy (and vs bitsandbytes if carried),
#    QLoRA step tokens/s + peak memory on a ~1.1B random llama vs HF + PEFT + bitsandbytes (if carried).
# 3. bench/gpu_dist.py: ZeRO-2 full fine-tuning of a random ~5B llama on one GPU, without offload (expected OOM on
#    an 80 GB card) and with --offload (tokens/s, GPU peak): dist/'s GPU path.
# The tables land in $OUT/gpu_check.md (copy them into bench/RESULTS.md). Dry-run the QLoRA section on a CPU
# first with `python bench/gpu_check.py --smoke-cpu` (tiny model; bitsandbytes CPU for the HF side).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (bitsandbytes): see /work/.library/device/README.md
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
OUTDIR="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nvcc --version | tail -1
# a failing test must not cost the measurements of this (expensive) call: record its status, go on, report it
set +e
python3 -m pytest -q -p no:cacheprovider tests/test_quant_cuda.py 2>&1 | tee "$OUTDIR/pytest_cuda.txt"
tests=${PIPESTATUS[0]}
python3 bench/gpu_check.py "$@" 2>&1 | tee "$OUTDIR/gpu_check.md"
bench=${PIPESTATUS[0]}
python3 bench/gpu_dist.py --steps 2 2>&1 | tee "$OUTDIR/gpu_dist.md"
zero=${PIPESTATUS[0]}
echo "pytest exit $tests, gpu_check exit $bench, gpu_dist exit $zero"
exit $(( tests || bench || zero ))
