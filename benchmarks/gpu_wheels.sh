#!/usr/bin/env bash
# Make a GPU image without the package registry able to run prunelab's checks: install each
# missing module from the wheel benchmarks/gpu_bundle.sh prepared in wheels/ (--no-deps: nothing
# already installed is replaced) into a folder of its own, PRUNELAB_SITE (default /tmp/prunelab-site),
# which the caller puts on PYTHONPATH: the image's own environment is never written to.
# Usage: PYTHONPATH=$PRUNELAB_SITE:src bash benchmarks/gpu_wheels.sh [LOG_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
site="${PRUNELAB_SITE:-/tmp/prunelab-site}"
mkdir -p "$out" "$site"
case ":${PYTHONPATH:-}:" in *":$site:"*) ;; *) export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
for pair in hydra:hydra_core omegaconf:omegaconf antlr4:antlr4_python3_runtime torch_pruning:torch_pruning \
            pytest:pytest pluggy:pluggy iniconfig:iniconfig pygments:pygments; do
    mod=${pair%%:*} whl=${pair#*:}
    python -c "import $mod" 2>/dev/null && continue
    ls wheels/${whl}-*.whl >/dev/null 2>&1 || { echo "gpu-check: $mod is missing and wheels/ has no ${whl} wheel: run benchmarks/gpu_bundle.sh where pip can download and carry wheels/"; exit 1; }
    python -m pip install -q --no-index --no-deps --no-compile --target "$site" wheels/${whl}-*.whl >> "$out/gpu-check-wheels.log" 2>&1 || {
        echo "gpu-check: installing wheels/${whl} failed, see $out/gpu-check-wheels.log"; exit 1; }
done
python -c "import hydra, omegaconf, yaml, torch_pruning, lightning, pytest, matplotlib, safetensors" || {
    echo "gpu-check: a dependency is missing (see the import error above)"; exit 1; }
