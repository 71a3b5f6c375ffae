#!/usr/bin/env bash
# The README's test command: install the package with its test extras, lint, run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[cpu,export,test]"
python -m ruff check .
python -m pytest -q "$@"
