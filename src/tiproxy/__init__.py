"""TiProxy for Python: a MySQL-protocol proxy."""

__version__ = "0.1.0"
