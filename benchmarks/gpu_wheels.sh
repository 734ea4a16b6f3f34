#!/usr/bin/env bash
# Fetch the wheels an offline GPU machine lacks into .whl/ (git-ignored), for gpu_check.sh to install.
#
#   bash benchmarks/gpu_wheels.sh                       # the two optional benchmark baselines
#   bash benchmarks/gpu_wheels.sh NAME==VERSION ...     # anything else the machine's image lacks
#
# Run it where pip reaches a registry.  The wheels are for the GPU machine, not this one: CPython
# $GPU_PY (default 3.12) on manylinux x86-64.  --no-deps: name every missing dependency too (the
# baselines' own needs -- typer, humanize, numpy -- ship with common CUDA images).  Let .whl/ travel
# with the tree (it is ~4 MB); gpu_check.sh installs it into a private folder on the GPU machine.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
GPU_PY=${GPU_PY:-3.12}
if [ $# -eq 0 ]; then
    set -- fastsafetensors==0.5.0 runai-model-streamer==0.17.1
fi
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
    manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
    platforms+=(--platform "$p")
done
mkdir -p "$ROOT/.whl"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$GPU_PY" --implementation cp \
    "${platforms[@]}" -d "$ROOT/.whl" "$@"
echo "gpu_wheels: $(ls "$ROOT/.whl" | wc -l) wheel(s) in .whl/ ($(du -sh "$ROOT/.whl" | cut -f1)); let .whl travel with the tree"
