#!/usr/bin/env bash
# Run an exported ONNX model on ONNX Runtime (CPU): accuracy with --labels, latency with
# --benchmark RUNS. Works on any machine.
#
# Usage: scripts/inference/infer_onnxruntime.sh MODEL.onnx [--input X.npy] [--labels Y.npy]
#        [--batch N] [--benchmark RUNS] [--threads T] [--output LOGITS.npy]
set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi
model=$1
shift
exec python -m paddle_qat infer "$model" --runtime onnxruntime "$@"
