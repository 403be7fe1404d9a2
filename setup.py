"""Builds the one compiled helper (protocol/_rowscan.c); everything else is in pyproject.toml.

The package works without it: tracker.py falls back to the same loop in Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("tiproxy.protocol._rowscan", ["src/tiproxy/protocol/_rowscan.c"],
                  optional=True),
    ],
)
