#!/usr/bin/env bash
# Fetch, on this (networked) machine, the pure-Python wheels that the lent GPU machine's image
# lacks for the GPU benches, into .whl/ (git-ignored). That machine cannot reach a package
# registry; its image has torch, lightning, torchmetrics, tokenizers, pillow, jinja2 and
# safetensors, but not Hydra, OmegaConf or WebDataset (the `device` tool's KINDS.md lists it).
# Then run bench/gpu_check.sh there with `.whl` carried. antlr4-python3-runtime 4.9.3 (Hydra's
# parser) is published as an sdist only, so it is built here into a py3-none-any wheel.
#
#   bash bench/gpu_wheels.sh          # -> .whl/*.whl, ~0.5 MB
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl hydra-core==1.3.2 omegaconf==2.3.0 webdataset==1.0.2 braceexpand==0.1.7
python3 -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -1 .whl
