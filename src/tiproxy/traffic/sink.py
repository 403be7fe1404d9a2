"""A data-plane process's share of a running capture: its sessions' records, handed on in batches.

Sessions add one Record per command (session.py); the sink hands them to the writer every
FLUSH_INTERVAL, or sooner once a batch is big, through `deliver`: straight into the writer's
queue in a one-process proxy, over the worker's link to the control process otherwise. Nothing
waits: `deliver` says False when the writer or the link is behind (its own bound is full), and
the batch is dropped and counted, so a slow disk costs commands in the capture, never time on
the data path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tiproxy.traffic.outcome import Summary

FLUSH_INTERVAL = 0.05  # seconds a record waits in the process at most
BATCH_RECORDS = 512
BATCH_BYTES = 4 * 1024 * 1024

# Record.flags: how the session's backend leg frames responses (for outcome.py), and whether
# its client asked for matched rather than changed rows in "rows affected" (CLIENT_FOUND_ROWS)
DEPRECATE_EOF = 1
EXTENDED_METADATA = 2
FOUND_ROWS = 4


# One captured command as the session saw it; a plain tuple, cheap to build and to pickle:
#   (start_ns, conn_id, packet, end_ns, error, status, response, statement, flags)
# - packet: the command payload, command byte first, as the client sent it; empty: a command
#   that could not be captured (16 MiB or more)
# - end_ns: when its response ended; 0: no response recorded (a rebuilt state's command, a quit)
# - error: the ERR's code, 0 when it succeeded; status: the server status after the response
# - response: the whole response, when the writer may read it (session.py); from a worker, what
#   it said instead (outcome.Summary)
# - statement: a COM_STMT_PREPARE's (client statement id, parameters, parameter types)
# - flags: DEPRECATE_EOF | EXTENDED_METADATA | FOUND_ROWS
Record = tuple[int, int, bytes, int, int, int, "bytes | Summary | None",
               tuple[int, int, bytes | None] | None, int]


Deliver = Callable[[list[Record], int], bool]  # (batch, its bytes) -> taken


class CaptureSink:
    """Collects records on the event loop and hands them on; see the module docstring."""

    def __init__(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._records: list[Record] = []
        self._bytes = 0
        self.dropped = 0  # records the writer or the link had no room for
        self.open = True
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, record: Record) -> None:
        if not self.open:
            return
        self._records.append(record)
        response = record[6]
        self._bytes += len(record[2]) + (len(response) if type(response) is bytes else 0)
        if len(self._records) >= BATCH_RECORDS or self._bytes >= BATCH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._records:
            return
        batch, size = self._records, self._bytes
        self._records, self._bytes = [], 0
        if not self._deliver(batch, size):
            self.dropped += len(batch)

    def close(self) -> None:
        """The capture ends here: what is held goes on, nothing more is taken."""
        self.flush()
        self.open = False
