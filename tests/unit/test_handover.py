"""The handover's own exchange (net/handover.py): the old process alone decides who keeps a
session, so that however late either side runs, one process and never two use its sockets."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
from collections.abc import Callable
from typing import Any

from tiproxy.net.handover import _LENGTH, Receiver, SessionHandover, send_session
from tiproxy.session.state import SessionState


def _handover(sid: int, *, commits: bool = True) -> SessionHandover:
    return SessionHandover(
        sid, "127.0.0.1:1", "app", "", "mysql", "127.0.0.1:2", 7, 0, 0, 0, None, None,
        SessionState(), 2, False, None, 0.0, 0, None, {}, 0, 0, None, commits=commits)


def _exchange(send: Callable[[str, SessionHandover, list[int]], Any],
              handovers: list[SessionHandover]) -> tuple[list[Any], list[int]]:
    """Run a receiver and hand it `handovers` with `send`, one socket pair per session (the
    session's two legs); what `send` answered each time, and the ids the receiver adopted. Each
    adopted session's client socket answers b"mine" to its peer, as the new process would."""
    adopted: list[int] = []

    def adopt(h: SessionHandover, socks: list[socket.socket]) -> bool:
        adopted.append(h.id)
        socks[0].sendall(b"mine")
        for sock in socks:
            sock.close()
        return True

    async def run() -> list[Any]:
        name = f"\0tiproxy-test-handover-{os.getpid()}-{id(handovers)}"
        receiver = Receiver(name, adopt, lambda _staying: None)
        answers = []
        try:
            for h in handovers:
                client, client_peer = socket.socketpair()
                backend, backend_peer = socket.socketpair()
                with client, client_peer, backend, backend_peer:
                    answers.append(await asyncio.to_thread(
                        send, name, h, [client.fileno(), backend.fileno()]))
                    client.close()  # as the old process lets go of its copies
                    backend.close()
                    client_peer.settimeout(5)
                    # (b"" once every copy is closed; in a thread: adopting needs the loop)
                    answers.append(await asyncio.to_thread(client_peer.recv, 16))
        finally:
            receiver.close()
        return answers

    return asyncio.run(run()), adopted


def _raw_send(name: str, h: SessionHandover, fds: list[int], *, commit: bool) -> bytes:
    """A sender of our own: the message and the descriptors, then the receiver's first byte;
    the commit byte only if `commit`."""
    payload = pickle.dumps(h)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(name)
        socket.send_fds(sock, [_LENGTH.pack(len(payload)) + payload], fds)
        ready = sock.recv(1)
        if commit:
            sock.sendall(b"\x01")
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # until the receiver is done with it
    return ready


def test_a_committed_handover_is_taken_once() -> None:
    answers, adopted = _exchange(send_session, [_handover(1), _handover(2)])
    assert answers == [True, b"mine", True, b"mine"]
    assert adopted == [1, 2]


def test_a_sender_that_gives_up_after_ready_keeps_the_session() -> None:
    """The old process's wait ran out just as the new one said ready: it hangs up without the
    commit and goes on with the session; the new process must not touch it. The next session
    still travels."""

    def give_up(name: str, h: SessionHandover, fds: list[int]) -> bytes:
        return _raw_send(name, h, fds, commit=h.id != 1)

    answers, adopted = _exchange(give_up, [_handover(1), _handover(2)])
    assert answers == [b"\x01", b"", b"\x01", b"mine"]  # session 1: nothing from the receiver
    assert adopted == [2]


def test_a_sender_from_before_the_commit_is_answered_once_adopted() -> None:
    """An older process sends no commit: its receiver builds the session, then answers."""

    def older(name: str, h: SessionHandover, fds: list[int]) -> bytes:
        return _raw_send(name, h, fds, commit=False)

    answers, adopted = _exchange(older, [_handover(3, commits=False)])
    assert answers == [b"\x01", b"mine"]
    assert adopted == [3]
