"""Session counts every process sees at once: one shared memory table, a row per worker.

A worker writes only its own row: column 0 holds its sessions, column 1 when a client last
logged in there (time.monotonic() in ms: a new connection to any worker is then likely one more
login, worth a backend connection before its greeting), column 2 whether it serves now (1: other
workers may pass it new connections, workers/handoff.py), column `slot` its sessions on the
backend the control process gave that slot (BackendState.slot, from FIRST_SLOT on). Any process
reads every row, so a worker routing a new connection knows its peers' sessions per backend as
of now (not as of a message some time ago), `max-connections` counts every worker's sessions,
and the control process's API and rebalancer see the sums. Each cell is one aligned 64-bit word
with a single writer, so a read never sees half a value and no lock is needed.

The memory is a memfd the control process creates and hands to each worker by file descriptor.
"""

from __future__ import annotations

import mmap
import os

SESSIONS = 0
LAST_LOGIN = 1
ALIVE = 2
FIRST_SLOT = 3
SLOTS = 4096  # backends a control process gives a slot to before it takes the oldest again
_WORD = 8


class SharedCounts:
    def __init__(self, workers: int, fd: int | None = None) -> None:
        """A new table (the control process), or the one behind `fd` (a worker)."""
        self.workers = workers
        self.width = FIRST_SLOT + SLOTS
        size = workers * self.width * _WORD
        if fd is None:
            fd = os.memfd_create("tiproxy-counts", os.MFD_CLOEXEC)  # pass_fds hands it on
            os.ftruncate(fd, size)
        self.fd = fd
        self._map = mmap.mmap(fd, size)
        self._cells = memoryview(self._map).cast("q")

    def get(self, worker: int, slot: int) -> int:
        return int(self._cells[worker * self.width + slot])

    def set(self, worker: int, slot: int, value: int) -> None:
        self._cells[worker * self.width + slot] = value

    def others(self, worker: int, slot: int) -> int:
        cells, width = self._cells, self.width
        return sum(int(cells[w * width + slot]) for w in range(self.workers) if w != worker)

    def latest(self, slot: int) -> int:
        cells, width = self._cells, self.width
        return max(int(cells[w * width + slot]) for w in range(self.workers))

    def total(self, slot: int) -> int:
        cells, width = self._cells, self.width
        return sum(int(cells[w * width + slot]) for w in range(self.workers))

    def clear(self, worker: int) -> None:
        """A worker that died holds no session any more."""
        start = worker * self.width
        self._cells[start:start + self.width] = memoryview(bytes(self.width * _WORD)).cast("q")
