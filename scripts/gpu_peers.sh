#!/usr/bin/env bash
# The peer benchmark on a GPU machine that has torch but no network (the `device` tool).
#
#   bash scripts/gpu_peers.sh prepare   # venv (system site packages: the machine's torch) + pyarrow
#   bash scripts/gpu_peers.sh run       # install the rest, run benchmarks/bench_peers.py on CUDA
#
# Wheels travel with the working tree (64 MiB per call, hence two calls on one warm machine):
#   .whl-arrow/  pyarrow, which TransformerLens imports through `datasets` (55 MB on its own)
#   .whl/        transformers 5.24, transformer-lens, nnsight and what they import
#   .whl-er/     easyroutine with its own pins (transformers 4.51.1, tokenizers, huggingface_hub),
#                installed into a separate folder that goes first on its worker's PYTHONPATH
# All peers then share one interpreter (--shared-python). A peer whose imports are missing
# shows as a failed row; the others still run.
set -u
VENV=/tmp/gpu-peers
PY=$VENV/bin/python
OUT=${OUT:-/tmp/gpu-peers-out}
mkdir -p "$OUT"
if [ ! -x "$PY" ]; then
  python3 -m venv --system-site-packages "$VENV"
fi
install() { "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check "$@"; }
case "${1:-run}" in
  prepare)
    [ -d .whl-arrow ] && install .whl-arrow/*.whl
    "$PY" -m pip list 2>/dev/null > "$OUT/pip-list-before.txt"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    ;;
  run)
    install .whl/*.whl
    [ -d .whl-er ] && install --target /tmp/er-site .whl-er/*.whl
    "$PY" -m pip list 2>/dev/null > "$OUT/pip-list.txt"
    export PYTHONPATH=$PWD/src
    timeout "${BENCH_TIMEOUT:-500}" "$PY" benchmarks/bench_peers.py --shared-python \
      --site easyroutine=/tmp/er-site --random-weights --dtype bfloat16 --inner 10 \
      --logs /tmp/gpu-peers-logs --write "$OUT/RESULTS_peers_gpu.md" 2>"$OUT/bench_peers.log"
    echo "bench_peers exit $?"
    cp /tmp/gpu-peers-logs/*.log "$OUT/" 2>/dev/null
    tail -5 "$OUT/bench_peers.log"
    ;;
esac
