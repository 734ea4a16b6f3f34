#!/usr/bin/env bash
# One prepared GPU check: `pytest -m gpu`, then benchmarks/bench_gpu.py, in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh
#
# Everything it writes goes into one folder: $OUT when set, else ./gpu-check-<UTC time>/
#   summary.txt        one line per step, the targets, PASS/FAIL and the seconds spent
#   env.txt            python, torch, CUDA, GPU (nvidia-smi) and package versions
#   pytest-gpu.log     the GPU tests' output;  pytest-gpu.xml  the same as JUnit XML
#   bench_gpu.jsonl    one JSON line per measurement;  bench_gpu.log  the benchmark's stderr
#
# Made for a fresh, offline GPU machine holding a copy of this tree: nothing is downloaded.
# Needed there: python3 with torch (CUDA build) and pytest; used when present: safetensors,
# transformers, accelerate, hypothesis, numpy, huggingface_hub (test collection and baselines).
# Not in a stock image: fastsafetensors and runai-model-streamer.  Fetch their wheels beforehand on
# a machine with a registry (`bash benchmarks/gpu_wheels.sh` -> .whl/), let .whl/ travel with the
# tree, and this script installs them into a private folder; without them their benchmark lines
# say "missing" and the fastsafetensors target is reported as not measured.
#
# Environment: OUT, PYTHON (default python3), GPU_CHECK_DIR (scratch disk for checkpoints, default
# /var/tmp), GPU_CHECK_GB (checkpoint size, default 8), GPU_CHECK_BUDGET_S (whole run, default 450),
# GPU_CHECK_PYTEST_S (test budget, default 150); GPU_CHECK_DEVICE=cpu is a dry run of the script's own
# plumbing on a machine without a GPU (tests skip, a tiny CPU benchmark runs; nothing is measured).
# Exit: 0 all passed; 1 a test or a torchst benchmark path failed; 2 no CUDA or a missing requirement.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-$ROOT/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
PY=${PYTHON:-python3}
SCRATCH=${GPU_CHECK_DIR:-/var/tmp}
GB=${GPU_CHECK_GB:-8}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
PYTEST_S=${GPU_CHECK_PYTEST_S:-150}
DEVICE=${GPU_CHECK_DEVICE:-cuda:0}
START=$(date +%s)
mkdir -p "$OUT_DIR" || { echo "gpu_check: FAIL cannot create the results folder $OUT_DIR" >&2; exit 2; }
SUMMARY=$OUT_DIR/summary.txt
: >"$SUMMARY"

say() { echo "gpu_check: $*" | tee -a "$SUMMARY"; }
fail() { echo "gpu_check: FAIL $1" | tee -a "$SUMMARY" >&2; exit "${2:-2}"; }
elapsed() { echo $(($(date +%s) - START)); }

command -v "$PY" >/dev/null 2>&1 || fail "no Python: '$PY' is not on PATH (set PYTHON=/path/to/python3)"

# -- 1. CUDA, first and fast: without it there is nothing to measure --------------------------------
reason=$(GPU_CHECK_DEVICE=$DEVICE timeout 120 "$PY" - 2>&1 <<'EOF'
import os, sys
try:
    import torch
except Exception as e:
    print(f"torch does not import ({type(e).__name__}: {e}); this check needs a CUDA build of PyTorch")
    sys.exit(1)
if os.environ["GPU_CHECK_DEVICE"] == "cpu":
    print(f"DRY RUN on CPU (GPU_CHECK_DEVICE=cpu): torch {torch.__version__}; plumbing only, no GPU numbers")
    sys.exit(0)
if not torch.cuda.is_available():
    built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
    print(f"no CUDA device: torch {torch.__version__} ({built}) sees no GPU; run this on a machine with an NVIDIA GPU")
    sys.exit(1)
print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
)
rc=$?
if [ $rc -ne 0 ]; then
    [ $rc -eq 124 ] && reason="CUDA did not answer within 120 s (torch.cuda.is_available() hung)"
    fail "$(echo "$reason" | tail -n 1)"
fi
say "device: $reason"

# -- 2. what must travel with the tree: wheels in .whl/ go to a private folder, never into the image --
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d /tmp/torchst-gpu-site.XXXXXX)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/*.whl \
        >"$OUT_DIR/env.txt" 2>&1; then
        export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
        say "installed from .whl/: $(cd "$ROOT/.whl" && ls -- *.whl | tr '\n' ' ')"
    else
        say "warning: the wheels in .whl/ did not install (see env.txt); their baselines will be missing"
    fi
else
    say "no .whl/ folder: fastsafetensors and runai-model-streamer are measured only if the image has them"
fi
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torchst", "pytest"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
[ -n "$missing" ] && fail "missing required Python packages: $missing (carry their wheels in .whl/: benchmarks/gpu_wheels.sh NAME==VERSION)"
optional=$("$PY" - <<'EOF'
import importlib.util
mods = ["safetensors", "transformers", "accelerate", "hypothesis", "numpy", "huggingface_hub", "fastsafetensors", "runai_model_streamer"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
)
[ -n "$optional" ] && say "not importable (their tests skip or their baselines read 'missing'): $optional"

mkdir -p "$SCRATCH" 2>/dev/null
{
    echo "== python"; "$PY" -VV
    echo "== packages"
    "$PY" - <<'EOF'
from importlib.metadata import version
for name in ["torch", "safetensors", "transformers", "accelerate", "huggingface-hub", "numpy", "pytest",
             "hypothesis", "fastsafetensors", "runai-model-streamer"]:
    try:
        print(f"{name}=={version(name)}")
    except Exception:
        print(f"{name}: not installed")
EOF
    echo "== nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi not available"
    echo "== memory and disk"; free -g 2>&1; df -h "$SCRATCH" 2>&1
} >>"$OUT_DIR/env.txt" 2>&1

# -- 3. the GPU tests (only files that hold some; collection of the rest costs time) ------------------
cd "$ROOT" || fail "cannot enter $ROOT"
mapfile -t files < <(grep -rl --include="test_*.py" "mark.gpu" tests | sort)
per_test=()  # a hung test is stopped with its stack in the log, not by the whole step's timeout
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=90)
timeout "$PYTEST_S" "$PY" -m pytest -m gpu -v -o addopts=-ra -p no:cacheprovider "${per_test[@]}" \
    --junitxml="$OUT_DIR/pytest-gpu.xml" "${files[@]}" >"$OUT_DIR/pytest-gpu.log" 2>&1
test_rc=$?
result=$(grep -E " in [0-9.]+s" "$OUT_DIR/pytest-gpu.log" | tail -n 1 | tr -d "=" | xargs)
[ $test_rc -eq 124 ] && result="stopped after ${PYTEST_S}s (GPU_CHECK_PYTEST_S); $result"
say "tests (pytest -m gpu, ${#files[@]} files): rc=$test_rc ${result:-no summary line, see pytest-gpu.log} [$(elapsed)s]"

# -- 4. the benchmark, within what is left of the budget -------------------------------------------
left=$((BUDGET - $(elapsed)))
if [ $left -lt 90 ]; then
    say "benchmark not run: only ${left}s of the ${BUDGET}s budget left (GPU_CHECK_BUDGET_S)"
    bench_rc=1
else
    # No benchmark job starts after --budget-s, and one that started ends within 60 s more.
    size=(--gb "$GB")
    [ "$DEVICE" = cpu ] && size=(--tiny)
    PYTHONUNBUFFERED=1 timeout "$left" "$PY" benchmarks/bench_gpu.py --device "$DEVICE" "${size[@]}" --dir "$SCRATCH" \
        --budget-s $((left - 75)) >"$OUT_DIR/bench_gpu.jsonl" 2>"$OUT_DIR/bench_gpu.log"
    bench_rc=$?
    [ $bench_rc -eq 124 ] && echo "stopped by the ${left}s budget" >>"$OUT_DIR/bench_gpu.log"
    say "benchmark (bench_gpu.py ${size[*]} --device $DEVICE): rc=$bench_rc, $(wc -l <"$OUT_DIR/bench_gpu.jsonl") JSON lines [$(elapsed)s]"
    "$PY" - "$OUT_DIR/bench_gpu.jsonl" <<'EOF' | tee -a "$SUMMARY"
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("bench") == "gpu_target":
        met = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[r.get("met")]
        why = f" ({r['reason']})" if r.get("reason") else ""
        print(f"  target {r['target']} [{r['impl']}]: {r.get('value')} vs {r['limit']}: {met}{why}")
    elif r.get("bench") in ("gpu_load", "gpu_save", "gpu_copy"):
        what = r.get("gb_per_s", r.get("blocked_s"))
        unit = "GB/s" if "gb_per_s" in r else "s blocked"
        state = r.get("status") or ("exact" if r.get("exact") else "NOT EXACT" if r.get("exact") is False else "")
        print(f"  {r['bench']} {r['impl']}: {what if what is not None else '-'} {unit if what is not None else ''} {state}".rstrip())
EOF
fi

if [ $test_rc -eq 0 ] && [ $bench_rc -eq 0 ]; then
    say "PASS in $(elapsed)s; results in $OUT_DIR"
    exit 0
fi
say "FAIL (tests rc=$test_rc, benchmark rc=$bench_rc) in $(elapsed)s; results in $OUT_DIR"
exit 1
