#!/usr/bin/env bash
# Install what is missing, then run the static checks and the whole test suite (unit, fuzz and
# integration tests against real servers the tests start themselves), then the integration tests
# once more with every proxy's data plane in two worker processes (`[proxy] workers = 2`).
# Arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check src tests bench deploy
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
status=0
TIPROXY_TEST_WORKERS=2 .venv/bin/python -m pytest -m integration "$@" || status=$?
if [ "$status" -eq 5 ]; then  # the arguments named no integration test: nothing to run again
    status=0
fi
exit "$status"
