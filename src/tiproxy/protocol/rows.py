"""Passing over a result's rows without reading them: the compiled scanners
(protocol/_rowscan.c) where they are built, else the Python fallback below, which does the
same per row. The ResponseTracker (protocol/tracker.py) calls them on every large result.
"""

from __future__ import annotations

from collections.abc import Callable

from tiproxy.protocol.codec import U32, Buffer
from tiproxy.protocol.constants import MAX_PAYLOAD

__all__ = ["ScanResult", "scan_result", "skip_plain_rows", "skip_plain_rows_py"]


def skip_plain_rows_py(data: Buffer, pos: int) -> tuple[int, int]:
    """Pass over whole rows that cannot end the result; return where the first other packet is
    and how many rows were passed over.

    The hot loop of a large result: one header read and one byte compare per row. The compiled
    twin in _rowscan.c does the same about fifty times faster; this one is the fallback.
    """
    n = len(data)
    unpack = U32.unpack_from
    rows = 0
    while pos + 4 < n:
        length = unpack(data, pos)[0] & 0xFFFFFF
        end = pos + 4 + length
        if end > n or length in (0, MAX_PAYLOAD):
            return pos, rows
        if data[pos + 4] in (0xFE, 0xFF):
            return pos, rows
        pos = end
        rows += 1
    return pos, rows


ScanResult = Callable[[Buffer, int, bool, int, int], "tuple[int, int, int, int] | None"]
scan_result: ScanResult | None
try:
    from tiproxy.protocol._rowscan import scan_result, skip_plain_rows
except ImportError:  # pragma: no cover - built by setup.py; the Python code is the fallback
    skip_plain_rows = skip_plain_rows_py
    scan_result = None
