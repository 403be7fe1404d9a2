"""New connections kept even over the workers: a worker that accepts a connection while it holds
more sessions than another worker passes it, before a byte is read, to the one with the fewest.

SO_REUSEPORT spreads connections by a hash of their addresses, which evens out only over many:
four long-lived connections land two and two 3 times in 8, and a worker with three of them is
the bottleneck while the other idles. HAProxy hands each accepted connection to its least loaded
thread for the same reason.

Each worker receives on one end of a datagram socket pair of its own, and holds the other end of
every worker's pair. The control process makes the pairs and keeps them, so a worker started
again gets its queue back. The accepting worker sends the socket (SCM_RIGHTS) and closes its own
descriptor: the connection lives on in the other process, which serves it as if it had accepted
it. The choice reads the shared table of session counts (workers/shared.py), so it costs no
round trip; a worker not serving now (starting, stopping, or dead and not yet started again) is
never chosen. A send that would block or fails leaves the connection where it was accepted.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from tiproxy.workers.shared import ALIVE, SESSIONS, SharedCounts

log = logging.getLogger("tiproxy.worker")


def socket_pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    """The control process's: one (receiving end, sending end) per worker."""
    return [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(count)]


class Handoff:
    def __init__(self, index: int, counts: SharedCounts, inbox: socket.socket,
                 outboxes: list[socket.socket]) -> None:
        self.index = index
        self.counts = counts
        self.inbox = inbox
        self.outboxes = outboxes
        self._loop: asyncio.AbstractEventLoop | None = None

    def target(self, mine: int) -> int:
        """The serving worker with the fewest sessions, if it has fewer than `mine` (this
        worker's, the new connection not counted); else -1."""
        counts, best, fewest = self.counts, -1, mine
        for worker in range(counts.workers):
            if worker != self.index and counts.get(worker, ALIVE):
                sessions = counts.get(worker, SESSIONS)
                if sessions < fewest:
                    best, fewest = worker, sessions
        return best

    def send(self, worker: int, sock: socket.socket) -> bool:
        """Pass the connection on; False if it stays here (the worker's queue is full, or it
        is gone)."""
        try:
            socket.send_fds(self.outboxes[worker], [b"c"], [sock.fileno()], socket.MSG_DONTWAIT)
        except OSError as e:
            log.debug("a connection stays in worker %d, not passed to worker %d: %s",
                      self.index, worker, e)
            return False
        return True

    def start(self, take: Callable[[socket.socket], None]) -> None:
        """Serve what other workers pass here: `take` each connection. This worker may be
        chosen from now on."""
        self._loop = asyncio.get_running_loop()
        self.inbox.setblocking(False)
        self._loop.add_reader(self.inbox.fileno(), self._receive, take)
        self.counts.set(self.index, ALIVE, 1)

    def stop(self) -> None:
        """Chosen no more; what is queued here stays queued (for this worker's next start, if
        the control process starts it again)."""
        self.counts.set(self.index, ALIVE, 0)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.inbox.fileno())
        self._loop = None

    def _receive(self, take: Callable[[socket.socket], None]) -> None:
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(self.inbox, 16, 16)
            except BlockingIOError:
                return
            except OSError as e:  # not expected of a socket pair: say so, keep serving
                log.warning("worker %d: passed connections not received: %s", self.index, e)
                return
            for fd in fds:
                take(socket.socket(fileno=fd))
