#!/usr/bin/env bash
# Fill benchmarks/wheels/ with what benchmarks/gpu_check.sh needs beyond the GPU machine's own packages (python
# 3.12, torch 2.11, transformers 5.17, accelerate 1.15): TRL and datasets for TRL's side, math-verify for
# train_sdpo.py, megatron-core for the Megatron check. gpu_check.sh installs only the wheels whose package is not
# already installed there. Run it on a machine with network; the folder must stay under 50 MiB.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
mkdir -p "$HERE/wheels"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --implementation cp -d "$HERE/wheels" \
  trl==1.16.0 datasets==5.2.0 dill multiprocess xxhash fsspec math-verify==0.9.0 latex2sympy2_extended \
  antlr4-python3-runtime==4.13.2 pandas python-dateutil pytz tzdata megatron-core==0.19.2
du -sh "$HERE/wheels"
