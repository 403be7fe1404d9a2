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

A worker that is down still has its listening sockets in the kernel's SO_REUSEPORT group (the
control process keeps them for its restart), so the kernel still puts some new connections in
its queue. Meanwhile the control process accepts there and passes them on the same way (Cover).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Container

from tiproxy.workers.shared import ALIVE, SESSIONS, SharedCounts

log = logging.getLogger("tiproxy.worker")

ANY = 1 << 62  # fewer sessions than any worker holds


def socket_pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    """The control process's: one (receiving end, sending end) per worker."""
    return [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(count)]


def fewest_sessions(counts: SharedCounts, below: int, besides: Container[int] = ()) -> int:
    """The serving worker (not one of `besides`) with the fewest sessions, if it has fewer
    than `below`; else -1."""
    best, fewest = -1, below
    for worker in range(counts.workers):
        if worker not in besides and counts.get(worker, ALIVE):
            sessions = counts.get(worker, SESSIONS)
            if sessions < fewest:
                best, fewest = worker, sessions
    return best


def pass_connection(outbox: socket.socket, sock: socket.socket) -> None:
    """Queue `sock` for the worker behind `outbox`; OSError if its queue is full or gone."""
    socket.send_fds(outbox, [b"c"], [sock.fileno()], socket.MSG_DONTWAIT)


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
        return fewest_sessions(self.counts, mine, (self.index,))

    def send(self, worker: int, sock: socket.socket) -> bool:
        """Pass the connection on; False if it stays here (the worker's queue is full, or it
        is gone)."""
        try:
            pass_connection(self.outboxes[worker], sock)
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


class Cover:
    """The listening sockets of a worker that is down, served by the control process until it
    is started again: each connection accepted there goes at once to the serving worker with
    the fewest sessions. Without this, the kernel would keep putting a share of the new
    connections in the dead worker's queue, where they wait for its restart (half a second, and
    up to RESTART_MAX for a worker that keeps dying). With no worker serving, nothing is
    accepted: the connections wait in the queue as they would have."""

    RETRY = 0.05  # seconds, when no worker can take a connection now

    def __init__(self, index: int, counts: SharedCounts, outboxes: list[socket.socket]) -> None:
        self.index = index
        self.counts = counts
        self.outboxes = outboxes
        self.passed = 0
        self._socks: list[socket.socket] = []
        self._held: socket.socket | None = None  # accepted, no worker's queue had room yet
        self._retry: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, socks: list[socket.socket]) -> None:
        self._loop = asyncio.get_running_loop()
        self._socks = socks
        for sock in socks:
            sock.setblocking(False)  # (the worker's own copy is non-blocking too, as it wants)
        self._watch()

    def stop(self) -> None:
        """The worker starts again (or the proxy stops): what is queued stays for it."""
        if self._loop is None:
            return
        self._unwatch()
        if self._held is not None:  # into the worker's own queue, which it reads when it starts
            try:
                pass_connection(self.outboxes[self.index], self._held)
            except OSError as e:
                log.warning("a connection accepted for worker %d is lost: %s", self.index, e)
            self._held.close()
            self._held = None
        self._loop = None
        if self.passed:
            log.info("%d new connections went to other workers while worker %d was down",
                     self.passed, self.index)
            self.passed = 0

    def _watch(self) -> None:
        assert self._loop is not None
        self._retry = None
        if self._held is not None and not self._send(self._held):
            self._retry = self._loop.call_later(self.RETRY, self._watch)
            return
        self._held = None
        for sock in self._socks:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _unwatch(self) -> None:
        assert self._loop is not None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for sock in self._socks:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())

    def _pause(self) -> None:
        assert self._loop is not None
        self._unwatch()
        self._retry = self._loop.call_later(self.RETRY, self._watch)

    def _accept(self, sock: socket.socket) -> None:
        while fewest_sessions(self.counts, ANY, (self.index,)) >= 0:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                return
            except OSError as e:  # (out of descriptors, say): the worker's queue keeps them
                log.warning("connections for worker %d not accepted while it is down: %s",
                            self.index, e)
                self._pause()
                return
            if not self._send(conn):
                self._held = conn
                self._pause()
                return
        self._pause()  # no worker serves: wait

    def _send(self, conn: socket.socket) -> bool:
        """Pass `conn` to the serving worker with the fewest sessions, or another with room."""
        tried = {self.index}
        while (worker := fewest_sessions(self.counts, ANY, tried)) >= 0:
            try:
                pass_connection(self.outboxes[worker], conn)
            except OSError:
                tried.add(worker)
                continue
            conn.close()
            self.passed += 1
            return True
        return False

