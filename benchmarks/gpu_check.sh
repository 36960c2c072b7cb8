#!/usr/bin/env bash
# Everything a GPU session checks, in one command (`make gpu-check`), within ~9 minutes on one H100 (the device tool's 10-minute limit per command):
# the gpu-marked tests, then the deploy-speed and fastest-model benchmarks on CUDA. Each step has
# its own time limit; results land in benchmarks/results (and in $OUT when the device tool sets it).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}src"
bash benchmarks/gpu_wheels.sh "$out" || exit 1
# The real subset when it travelled with the checkout (gpu_bundle.sh), else synthetic data.
if [ -d data/cifar10-subset/cifar-10-batches-py ]; then fastest=(--data-root data/cifar10-subset --epochs 5); else fastest=(--quick); fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu-check-device.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$out/gpu-check-$name.log" 2>&1
    echo "$name: exit $?" | tee -a "$out/gpu-check-summary.txt"
    tail -5 "$out/gpu-check-$name.log"
}
# Only the files with gpu-marked tests: others import test-only packages (hypothesis) the image lacks.
mapfile -t gpu_tests < <(grep -l "pytest.mark.gpu" tests/*.py)
step tests 240 python -m pytest -q -m gpu -p no:cacheprovider --durations=20 "${gpu_tests[@]}"
step deploy 90 python -m benchmarks.deploy_speed --device cuda --out "$out"
step fastest 220 python -m benchmarks.fastest --device cuda "${fastest[@]}" --out "$out"
