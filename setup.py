"""Builds the one compiled helper (protocol/_rowscan.c); everything else is in pyproject.toml.

The package works without it: tracker.py and traffic/outcome.py fall back to the same loops in
Python. It links zlib (zlib1g-dev) for the CRC-32 a traffic capture sums rows with.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("tiproxy.protocol._rowscan", ["src/tiproxy/protocol/_rowscan.c"],
                  libraries=["z"], optional=True),
    ],
)
