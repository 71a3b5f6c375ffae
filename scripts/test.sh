#!/usr/bin/env bash
# The README's test command: install the package with its test extras, lint, run the suite.
#
# Usage: scripts/test.sh [pytest flags, e.g. -k export]
set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[cpu,export,test]"
python -m ruff check .
python -m pytest -q "$@"
