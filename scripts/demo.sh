#!/usr/bin/env bash
# The README's main job: install paddle-qat (CPU) and run the end-to-end QAT demo.
# Extra arguments go to `python -m paddle_qat.demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[cpu,export,demo]"
python -m paddle_qat.demo "$@"
