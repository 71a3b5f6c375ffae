#!/usr/bin/env bash
# ResNet50 v1.5 AMP baseline, 90 epochs on ImageNet (DeepLearningExamples' recipe).
#
# Usage: scripts/training/train_resnet50_AMP_90E.sh [train.py flags, e.g. --image-root /data]
#   GPUS / IPS / LAUNCH as in scripts/training/launch.sh. Writes ./output/epoch_NNNN and
#   ./inference_amp/resnet_50_paddle.{pdmodel,pdiparams,onnx}.
set -euo pipefail
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/../lib/usage.bash" 0 "$@"
exec bash "$(dirname "$0")/launch.sh" --epochs 90 --amp --scale-loss 128.0 \
    --use-dynamic-loss-scaling --inference-dir ./inference_amp "$@"
