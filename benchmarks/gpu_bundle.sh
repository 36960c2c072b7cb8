#!/usr/bin/env bash
# Prepare, on a machine with the package registry, what a GPU machine without it needs for
# `make gpu-check`: wheels of the pure-Python dependencies its image lacks (wheels/), the shared
# CIFAR-10 subset (data/cifar10-subset) and the class-folder CIFAR-10 (data/cifar10-jpeg.tar.gz). Both folders are git-ignored: hand them to the GPU machine
# with the checkout (the device tool's `carry: ["wheels", "data"]`). The GPU image's own torch,
# torchvision and lightning are used as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
subset="${1:-../shared/data/cifar10-subset}"
jpeg="${2:-../shared/data/cifar10-jpeg}"
rm -rf wheels && mkdir -p wheels
# antlr4-python3-runtime 4.9.3 (hydra-core's pin) publishes no wheel: pip builds one here. pytest
# and its pure-Python dependencies too: the GPU image has no test runner.
python -m pip wheel -q --no-deps -w wheels hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
    torch-pruning==1.6.1 pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 pygments==2.20.0
if [ -d "$subset/cifar-10-batches-py" ]; then
    mkdir -p data/cifar10-subset && cp -r "$subset/cifar-10-batches-py" data/cifar10-subset/
else
    echo "gpu_bundle: no CIFAR-10 subset at $subset (pass its folder as the first argument); the fastest-model step will use synthetic data" >&2
fi
# All of CIFAR-10 as JPEG class folders, for the worthy step: 60,000 small files gzip to about 20 MB
# as one archive (their JPEG headers repeat), where the decoded arrays (184 MB) would not travel.
if [ -d "$jpeg/train" ]; then
    mkdir -p data && tar -C "$(dirname "$jpeg")" -czf data/cifar10-jpeg.tar.gz "$(basename "$jpeg")"
else
    echo "gpu_bundle: no class-folder CIFAR-10 at $jpeg (pass its folder as the second argument); the worthy step will run --quick" >&2
fi
ls wheels && du -sh wheels data 2>/dev/null || true
