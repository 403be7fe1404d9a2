#!/usr/bin/env bash
# Install what is missing, then run the static checks and the whole test suite (unit, fuzz and
# integration tests against real servers the tests start themselves). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
