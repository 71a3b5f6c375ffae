#!/usr/bin/env bash
# The README's main job: install paddle-qat (CPU) and run the end-to-end QAT demo
# (FP32 training, fleet QAT fine-tuning, ONNX export, ONNX Runtime table) on 2 CPU cores.
#
# Usage: scripts/demo.sh [python -m paddle_qat.demo flags, e.g. --out runs/demo]
set -euo pipefail
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/lib/usage.bash" 0 "$@"
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[cpu,export,demo]"
python -m paddle_qat.demo "$@"
