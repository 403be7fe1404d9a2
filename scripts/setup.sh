#!/usr/bin/env bash
# Install everything the proxy, its playground, its tests and its benchmarks need on a fresh
# Debian machine, then create the Python environment in .venv. Safe to run again: it only adds
# what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# openjdk-17-jdk-headless and libmariadb-java: MariaDB Connector/J for the bulk-execution tests;
# chromium and chromium-driver: the status page is tested in headless Chromium (Selenium);
# zlib1g-dev: the compiled row scanner's CRC-32 (traffic captures); libssl-dev: the compiled
# relay drives the TLS connections of Python's ssl module (OpenSSL) for sessions it reads directly;
# prometheus: a real Prometheus (and promtool) for the Grafana dashboard and alert rules tests;
# iproute2: `ip`, which puts [ha] virtual-ip on its interface, and the tests' network namespaces;
# nodejs and npm: the Node.js clients' tests (mysql2, mariadb), unless a Node.js is there already;
# php-cli and php-mysql (mysqlnd: mysqli, PDO), golang-go and golang-github-go-sql-driver-mysql-dev:
# the PHP and Go clients' tests; mariadb-test: MariaDB's own test suite and its mariadb-test
# (mysqltest) program, run directly and through the proxy.
debs=(mariadb-server mariadb-client galera-4 rsync etcd-server etcd-client sysbench haproxy
      libmariadb-dev pkg-config build-essential openjdk-17-jdk-headless libmariadb-java
      chromium chromium-driver zlib1g-dev libssl-dev prometheus iproute2 php-cli php-mysql golang-go
      golang-github-go-sql-driver-mysql-dev mariadb-test)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  missing+=(nodejs npm)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq
  # The packaged services must not start on their own: the tests and the playground start their
  # own servers on free ports.
  printf '#!/bin/sh\nexit 101\n' | $sudo_ tee /usr/sbin/policy-rc.d >/dev/null
  $sudo_ chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${missing[@]}"
  $sudo_ rm -f /usr/sbin/policy-rc.d
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
# The stamp covers every compiled source: a changed one is built again (pip install -e builds in place).
stamp=.venv/.installed-$(cat pyproject.toml setup.py src/tiproxy/*/*.c src/tiproxy/*/*.h | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# mysqlclient's own test suite, from its source distribution at the installed version: run
# through the proxy while its sessions move (tests/integration/test_driver_suites.py).
suites=.venv/driver-suites
mc_version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("mysqlclient"))')
if [ ! -d "$suites/mysqlclient-$mc_version/tests" ]; then
  mkdir -p "$suites"
  .venv/bin/python -m pip download -q --no-binary :all: --no-deps -d "$suites" "mysqlclient==$mc_version"
  tar xzf "$suites/mysqlclient-$mc_version.tar.gz" -C "$suites"
fi

# The Node.js clients, at the versions package-lock.json names.
node_dir=tests/support/node
node_stamp=$node_dir/node_modules/.installed-$(sha1sum < $node_dir/package-lock.json | cut -c1-12)
if [ ! -f "$node_stamp" ]; then
  npm ci --prefix "$node_dir" --no-audit --no-fund --loglevel=error
  touch "$node_stamp"
fi
