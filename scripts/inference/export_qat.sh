#!/usr/bin/env bash
# Export a QAT checkpoint: ONNX with explicit INT8 Q/DQ, checked for the target it was trained
# for (TensorRT's rules, or ONNX Runtime running every quantized op in INT8), plus a Paddle
# inference model that keeps its quant ops (Paddle Inference / Paddle-TRT).
#
# Usage: scripts/inference/export_qat.sh CHECKPOINT OUT_DIR [python -m paddle_qat export flags]
#   CHECKPOINT  an epoch_NNNN folder, or the folder of checkpoints (its latest is used)
#   OUT_DIR     gets qat_int8.onnx and paddle/qat.pdmodel + .pdiparams
set -euo pipefail
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/../lib/usage.bash" 2 "$@"
checkpoint=$1 out=$2
shift 2
python -m paddle_qat export --checkpoint "$checkpoint" --onnx "$out/qat_int8.onnx" \
    --paddle-model "$out/paddle/qat" "$@"
