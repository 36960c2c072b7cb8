#!/usr/bin/env bash
# Everything a GPU session checks, in one command: `bash benchmarks/gpu_check.sh [STEP ...]`.
#   tests    the gpu-marked tests (pytest-xdist workers where the image has it)
#   deploy   benchmarks.deploy_speed --device cuda (dense eager / deploy / channel / 2:4, in turns)
#   runtimes benchmarks.runtimes --device cuda (eager, deploy bf16/fp16 with CUDA graphs, inductor, ONNX Runtime's
#            CUDA provider where installed: what latency.runtime=auto weighs on a GPU; RUNTIMES_ARGS adds arguments)
#   call     benchmarks.deploy_call --profile (the graph alone vs the deploy call, fused conv+ReLU, kernels)
#   scale    benchmarks.finetune_scale --device cuda (notebook loop vs defaults vs fast, 40k/10k)
#   graphs   the same for notebook, fast and fast-compile-default (what fast's CUDA-graph compile buys)
#   fastest  benchmarks.fastest --device cuda (the real subset when it travelled, else --quick)
#   overhead benchmarks.step_overhead --device cuda (prunelab's training step vs a plain loop)
#   stepvgg  the same with VGG16 in bf16-mixed (is a fine-tune step the model's or the loop's time?)
#   worthy   benchmarks.worthy --device cuda: the recipe trains VGG16 on all of CIFAR-10 (JPEG class folders,
#            data/cifar10-jpeg.tar.gz from gpu_bundle.sh), then the latency search one-shot and iterative
#   seeds    the same, one-shot, for seeds 1 and 2 (each its own model), as long as its limit allows
# WORTHY_ARGS adds arguments to both (WORTHY_ARGS="--quick --device cpu" dry-runs them without a GPU).
# TESTS_K=expr narrows the tests step to pytest -k expr. RUNTIMES_DEVICE=cpu RUNTIMES_ARGS=--quick dry-runs the runtimes step.
# Default (`make gpu-check`): tests deploy call overhead fastest; `make gpu-scale`: scale. Each step has its own
# time limit (override with LIMIT_<step>=seconds) so one slow step cannot eat the others' time.
# Results land in benchmarks/results; when the device tool sets $OUT (which returns at most 8
# files), they are also packed after every step into $OUT/gpu-check.tar.gz, so a step killed at its
# limit still leaves the earlier steps' results (and its own partial ones) behind.
set -uo pipefail
cd "$(dirname "$0")/.."
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests deploy call overhead fastest)
res=benchmarks/results
mkdir -p "$res"
# src, and the folder gpu_wheels.sh installs missing packages into
export PRUNELAB_SITE="${PRUNELAB_SITE:-/tmp/prunelab-site}"
# absolute: tests run the CLI from other working directories
export PYTHONPATH="$PRUNELAB_SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
stamp="$(date -u +%Y-%m-%d)"
summary="$res/$stamp-gpu-check-summary.txt"
logs="$res/.gpu-check-logs"  # step logs: packed into $OUT, not committed
rm -rf "$logs" && mkdir -p "$logs"
pack() {
    [ -n "${OUT:-}" ] || return 0
    # every result file this run wrote (newer than the marker) plus the logs
    find "$res" -maxdepth 1 -type f -newer "$logs/.start" -print0 | tar -czf "$OUT/gpu-check.tar.gz.tmp" \
        --null -T - "$logs" 2>/dev/null && mv "$OUT/gpu-check.tar.gz.tmp" "$OUT/gpu-check.tar.gz"
    cp "$summary" "$OUT/" 2>/dev/null || true
}
touch "$logs/.start"
sleep 1  # files written from here on are newer than the marker
bash benchmarks/gpu_wheels.sh "$logs" || { pack; exit 1; }
{
    echo "date: $(date -u +%FT%TZ)  git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')  steps: ${steps[*]}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
    python -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__, 'capability', torch.cuda.get_device_capability() if torch.cuda.is_available() else None)" 2>&1
} >> "$summary"
failed=0
step() {  # step NAME DEFAULT_SECONDS COMMAND...
    local name=$1 var="LIMIT_$1" limit t0 rc; limit=${!var:-$2}; shift 2
    echo "== $name (limit ${limit}s)"
    t0=$(date +%s)
    # -k: Lightning catches SIGTERM and finishes its batch first; KILL follows 10 s later
    timeout -k 10 "$limit" "$@" > "$logs/$name.log" 2>&1
    rc=$?
    [ $rc = 0 ] || failed=1
    echo "$name: exit $rc$( { [ $rc = 124 ] || [ $rc = 137 ]; } && echo ' (killed at its time limit)') after $(( $(date +%s) - t0 )) s" | tee -a "$summary"
    tail -5 "$logs/$name.log"
    pack
}
for s in "${steps[@]}"; do
    case $s in
        tests)
            # Only the files with gpu-marked tests: others import test-only packages an image may lack.
            mapfile -t files < <(grep -l "pytest.mark.gpu" tests/*.py)
            workers=(); python -c "import xdist" 2>/dev/null && workers=(-n 4)
            step tests 180 python -m pytest -q -m gpu -p no:cacheprovider --durations=15 "${workers[@]}" \
                ${TESTS_K:+-k "$TESTS_K"} "${files[@]}" ;;
        deploy) step deploy 100 python -m benchmarks.deploy_speed --device cuda --out "$res" ;;
        # shellcheck disable=SC2086 # RUNTIMES_ARGS is split into words on purpose
        runtimes) step runtimes 240 python -m benchmarks.runtimes --device "${RUNTIMES_DEVICE:-cuda}" --out "$res" \
            ${RUNTIMES_ARGS:-} ;;
        call) step call 90 python -m benchmarks.deploy_call --profile --out "$res" ;;
        overhead) step overhead 60 python -m benchmarks.step_overhead --device cuda --out "$res" ;;
        stepvgg) step stepvgg 90 python -m benchmarks.step_overhead --device cuda --arch vgg16 --precision bf16-mixed \
            --steps 100 --out "$res" ;;
        scale) step scale 240 python -m benchmarks.finetune_scale --device cuda --epochs 3 --out "$res" ;;
        graphs) step graphs 240 python -m benchmarks.finetune_scale --device cuda --epochs 3 \
            --procedures notebook fast fast-compile-default --out "$res" ;;
        fastest)
            if [ -d data/cifar10-subset/cifar-10-batches-py ]; then args=(--data-root data/cifar10-subset --epochs 5)
            else args=(--quick); fi
            step fastest 200 python -m benchmarks.fastest --device cuda "${args[@]}" --out "$res" ;;
        worthy|seeds)
            jpeg=/tmp/prunelab-data/cifar10-jpeg
            if [ ! -d "$jpeg/train" ] && [ -f data/cifar10-jpeg.tar.gz ]; then
                mkdir -p /tmp/prunelab-data && tar -C /tmp/prunelab-data -xzf data/cifar10-jpeg.tar.gz
            fi
            if [ -d "$jpeg/train" ]; then wargs=(--data-root "$jpeg"); else wargs=(--quick); fi
            # shellcheck disable=SC2206 # WORTHY_ARGS is split into words on purpose
            wargs+=(--device cuda --out "$res" ${WORTHY_ARGS:-})
            if [ "$s" = worthy ]; then
                step worthy 420 python -m benchmarks.worthy "${wargs[@]}" --schedules oneshot iterative --seed 0
            else
                step seeds 300 bash -c 'for seed in 1 2; do python -m benchmarks.worthy "$@" --seed $seed || exit 1; done' \
                    _ "${wargs[@]}" --schedules oneshot
            fi ;;
        *) echo "gpu_check: unknown step '$s' (tests, deploy, runtimes, call, overhead, stepvgg, scale, graphs, fastest, worthy, seeds)"; exit 2 ;;
    esac
done
exit $failed
