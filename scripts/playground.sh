#!/usr/bin/env bash
# Install what is missing, then start the local playground: MariaDB servers with the proxy on
# 127.0.0.1:6000 and its API on 127.0.0.1:3080. Arguments go to `tiproxy playground`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/tiproxy playground "$@"
