#!/usr/bin/env bash
# Set everything up, then run the default test suite (CPU; no GPU or slow tests).
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k urza
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
