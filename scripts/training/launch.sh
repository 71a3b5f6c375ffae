#!/usr/bin/env bash
# Run paddle_qat/train.py under paddle.distributed.launch (sourced by the train_*.sh scripts;
# runnable alone with train.py flags).
#
# Usage: scripts/training/launch.sh [train.py flags]   (python paddle_qat/train.py --help)
# Environment:
#   GPUS    devices of this node (default 0,1,2,3,4,5,6,7)
#   IPS     comma-separated node addresses for multi-node runs; run the same command on each
#   LAUNCH  the whole launcher, replacing the above; LAUNCH=python runs one process (CPU)
set -euo pipefail
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/../lib/usage.bash" 0 "$@"
train_py="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/paddle_qat/train.py"
default_launch="python -m paddle.distributed.launch --gpus=${GPUS:-0,1,2,3,4,5,6,7}${IPS:+ --ips=$IPS}"
# shellcheck disable=SC2086  # LAUNCH is a command line on purpose
exec ${LAUNCH:-$default_launch} "$train_py" "$@"
