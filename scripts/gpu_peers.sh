#!/usr/bin/env bash
# The peer benchmark on a GPU machine that has torch but no network (the `device` tool).
#
#   bash scripts/gpu_peers.sh prepare   # carry .whl-arrow: install pyarrow
#   bash scripts/gpu_peers.sh run       # carry .whl and .whl-er: install the rest, run on CUDA
#
# Wheels travel with the working tree (64 MiB per call, hence two calls on one warm machine):
#   .whl-arrow/  pyarrow, which TransformerLens imports through `datasets` (55 MB on its own)
#   .whl/        transformers 5.24, transformer-lens, nnsight and what they import
#   .whl-er/     easyroutine with its own pins (transformers 4.51.1, tokenizers, huggingface_hub),
#                kept in a separate folder that goes first on its worker's PYTHONPATH (--site)
# Everything is installed with --target into folders on PYTHONPATH: a venv made with
# --system-site-packages did not see the machine's torch. All peers share that interpreter
# (--shared-python). A peer whose imports are missing shows as a failed row; the others run.
set -u
OUT=${OUT:-/tmp/gpu-peers-out}
mkdir -p "$OUT"
install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check "$@"
}
export PYTHONPATH=/tmp/peer-site:/tmp/peer-site-arrow:$PWD/src
case "${1:-run}" in
  prepare)
    install --target /tmp/peer-site-arrow .whl-arrow/*.whl
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    ;;
  run)
    install --target /tmp/peer-site .whl/*.whl
    install --target /tmp/er-site .whl-er/*.whl
    timeout "${BENCH_TIMEOUT:-500}" python3 benchmarks/bench_peers.py --shared-python \
      --site easyroutine=/tmp/er-site --random-weights --dtype bfloat16 --inner 10 \
      --logs /tmp/gpu-peers-logs --write "$OUT/RESULTS_peers_gpu.md" 2>"$OUT/bench_peers.log"
    echo "bench_peers exit $?"
    cp /tmp/gpu-peers-logs/*.log "$OUT/" 2>/dev/null
    ;;
esac
