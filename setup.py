"""Builds the compiled helpers; everything else is in pyproject.toml.

- protocol/_rowscan.c: the tracker's row loops and the traffic writer's row sum. It links zlib
  (zlib1g-dev) for the CRC-32 a traffic capture sums rows with.
- net/_hotpath.c: the relay's per-query path; net/_direct.c: the reader that runs it for a
  steady session straight from the sockets, TLS ones with OpenSSL (libssl-dev), as Python's
  ssl module links it.

Both read whole responses with protocol/_scan.h. The package works without them: tracker.py,
traffic/outcome.py and relay.py fall back to the same logic in Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("tiproxy.protocol._rowscan", ["src/tiproxy/protocol/_rowscan.c"],
                  depends=["src/tiproxy/protocol/_scan.h"], libraries=["z"], optional=True),
        Extension("tiproxy.net._hotpath",
                  ["src/tiproxy/net/_hotpath.c", "src/tiproxy/net/_direct.c"],
                  depends=["src/tiproxy/protocol/_scan.h", "src/tiproxy/net/_hotpath.h"],
                  libraries=["ssl", "crypto"], optional=True),
    ],
)
