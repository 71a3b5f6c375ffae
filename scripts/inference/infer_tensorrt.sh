#!/usr/bin/env bash
# Build (or reuse) a TensorRT explicit-quantization engine from an exported ONNX model and run
# it: accuracy with --labels, latency with --benchmark RUNS. Needs an NVIDIA GPU and
# `pip install paddle-qat[tensorrt]` (TensorRT 10 or 11); the engine is written next to the
# ONNX file (MODEL.engine) unless --engine says otherwise.
#
# Usage: scripts/inference/infer_tensorrt.sh MODEL.onnx|MODEL.engine [--input X.npy]
#        [--labels Y.npy] [--batch N] [--benchmark RUNS] [--engine E] [--rebuild]
set -euo pipefail
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/../lib/usage.bash" 1 "$@"
model=$1
shift
exec python -m paddle_qat infer "$model" --runtime tensorrt "$@"
