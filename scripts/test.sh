#!/usr/bin/env bash
# The README's test command: install the package with its test extras, lint, run the suite.
#
# Usage: scripts/test.sh [pytest flags, e.g. -k export]
set -euo pipefail
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/lib/usage.bash" 0 "$@"
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[cpu,export,test]"
python -m ruff check .
python -m pytest -q "$@"
