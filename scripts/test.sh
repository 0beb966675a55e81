#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# pytest exits 5 when it collects no test: that fails this script too.
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
