#!/usr/bin/env bash
# Install what is missing, then start the local playground: a 3-node MariaDB Galera cluster
# (or `--plain N` independent servers) with the proxy on
# 127.0.0.1:6000 and its API on 127.0.0.1:3080. Arguments go to `tiproxy playground`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/tiproxy playground "$@"
