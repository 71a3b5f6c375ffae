#!/usr/bin/env bash
# QAT fine-tuning of a trained ResNet50 v1.5 for 10 epochs with AMP: strategy.qat = True, scales
# calibrated first, then exported as ONNX with INT8 Q/DQ for TensorRT.
#
# Usage: scripts/training/train_resnet50_AMP_QAT_10E.sh [CHECKPOINT] [train.py flags]
#   CHECKPOINT  the FP32/AMP run to fine-tune: a checkpoint folder or .pdparams
#               (default ./output/epoch_0090)
#   GPUS / IPS / LAUNCH as in scripts/training/launch.sh. Writes ./output_qat/epoch_NNNN and
#   ./inference_qat/resnet_50_paddle.{pdmodel,pdiparams,onnx}.
set -euo pipefail
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/../lib/usage.bash" 0 "$@"
checkpoint=./output/epoch_0090
if [[ $# -gt 0 && "$1" != --* ]]; then checkpoint=$1; shift; fi
exec bash "$(dirname "$0")/launch.sh" --from-pretrained-params "$checkpoint" --epochs 10 \
    --amp --scale-loss 128.0 --use-dynamic-loss-scaling --qat --lr 0.00005 \
    --warmup-epochs 0 --output-dir ./output_qat --inference-dir ./inference_qat "$@"
