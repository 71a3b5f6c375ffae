#!/usr/bin/env bash
# Run an exported ONNX model on ONNX Runtime (CPU): accuracy with --labels, latency with
# --benchmark RUNS. Works on any machine.
#
# Usage: scripts/inference/infer_onnxruntime.sh MODEL.onnx [--input X.npy] [--labels Y.npy]
#        [--batch N] [--benchmark RUNS] [--threads T] [--output LOGITS.npy]
set -euo pipefail
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/../lib/usage.bash" 1 "$@"
model=$1
shift
exec python -m paddle_qat infer "$model" --runtime onnxruntime "$@"
