#!/usr/bin/env bash
# The one GPU check: bash benchmarks/gpu_check.sh [--budget SECONDS] [--skip steps loss zero3 megatron]
#
# For a single-GPU machine with no network and its own Python (3.12, torch 2.11, transformers 5.17, accelerate
# 1.15). Packages it lacks (trl, datasets, ...) travel as wheels in benchmarks/wheels/ (fill it with
# benchmarks/fetch_gpu_wheels.sh on a machine with network); they are installed with pip --no-index into a
# private folder on PYTHONPATH, so the machine's own environment is left as it is. Prints one table at the end;
# takes under 8 minutes (the Python part keeps to --budget, 450 s by default).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-$HERE/wheels}"

shopt -s nullglob
all_wheels=("$WHEELS"/*.whl)
# only wheels of packages this Python lacks: a carried copy must never shadow the machine's own torch stack
mapfile -t wheels < <("$PYTHON" - "${all_wheels[@]}" <<'PY'
import importlib.metadata, sys
for path in sys.argv[1:]:
    name = path.rsplit("/", 1)[-1].split("-")[0]
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        print(path)
PY
)
if (( ${#wheels[@]} )); then
  SITE="${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/sdft_gpu_check_site}"
  echo "installing ${#wheels[@]} of ${#all_wheels[@]} wheels from $WHEELS into $SITE (pip --no-index --no-deps)"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --upgrade --target "$SITE" \
    "${wheels[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "nothing to install from $WHEELS (${#all_wheels[@]} wheels): using the installed packages (TRL's side is skipped without trl)"
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled \
  TRL_EXPERIMENTAL_SILENCE=1 PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec "$PYTHON" "$HERE/gpu_check.py" "$@"
