"""The pool's bookkeeping (net/pool.py): what it sends to reset a kept connection, what it does
with each answer, and its counts, with the server's answers fed in by hand. The integration
tests (test_backend_pool.py) run it against MariaDB."""

from __future__ import annotations

from collections import Counter

import pytest

from tiproxy.balance.router import Backend, Router
from tiproxy.client.leg import BackendLeg
from tiproxy.net.pool import KEPT, REUSED, BackendPool, PoolLogin
from tiproxy.protocol.constants import ServerStatus
from tiproxy.protocol.packets import Greeting, build_err, build_ok, frame
from tiproxy.session.login_actions import PoolKey

OK = frame(build_ok(int(ServerStatus.AUTOCOMMIT)), 1)
GREETING = Greeting("5.5.5-10.11.19-MariaDB", 42, b"s" * 20, 0, 45, 2, "mysql_native_password")
KEY = PoolKey("app", b"test", 0x1234, 0, 45)
CREDENTIAL = b"c" * 20


class Transport:
    """The part of an asyncio transport a leg uses: what was written, and how it ended."""

    def __init__(self) -> None:
        self.written = b""
        self.ended = ""
        self.reading_resumed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return bool(self.ended)

    def close(self) -> None:
        self.ended = self.ended or "closed"

    def abort(self) -> None:
        self.ended = self.ended or "aborted"

    def resume_reading(self) -> None:
        self.reading_resumed = True


def leg() -> tuple[BackendLeg, Transport]:
    transport = Transport()
    backend_leg = BackendLeg()
    backend_leg.connection_made(transport)  # type: ignore[arg-type]
    return backend_leg, transport


@pytest.fixture
def backend() -> Backend:
    b = Backend("127.0.0.1:3306", "127.0.0.1", 3306)
    b.keep_unfit = ""
    return b


@pytest.fixture
def pool() -> BackendPool:
    p = BackendPool(Counter())
    p.configure(2, 30.0)
    return p


def kept(pool: BackendPool, backend: Backend,
         database: bytes | None = b"test") -> tuple[BackendLeg, Transport]:
    backend_leg, transport = leg()
    key = PoolKey("app", database, 0x1234, 0, 45)
    login = PoolLogin(key, backend_leg, GREETING, build_ok(2), 0x1234, 0.0)
    assert pool.keep(backend, login, CREDENTIAL)
    return backend_leg, transport


def test_a_kept_connection_is_reset_and_given_its_database_then_served_once(
        pool: BackendPool, backend: Backend) -> None:
    backend_leg, transport = kept(pool, backend)
    assert transport.written == frame(b"\x1f", 0) + frame(b"\x02test", 0)
    assert transport.reading_resumed
    assert pool.idle == 0  # not before both answers
    backend_leg.data_received(OK)
    assert pool.idle == 0
    backend_leg.data_received(OK[:3])  # an answer may come in pieces
    backend_leg.data_received(OK[3:])
    assert pool.idle == 1 and pool.events[KEPT] == 1
    assert pool.take(backend, KEY, b"x" * 20) is None  # another password
    assert pool.take(backend, PoolKey("app", b"other", 0x1234, 0, 45), CREDENTIAL) is None
    taken = pool.take(backend, KEY, CREDENTIAL)
    assert taken is not None and taken.leg is backend_leg and backend_leg.session is None
    assert (pool.idle, pool.events[REUSED]) == (0, 1)
    assert pool.take(backend, KEY, CREDENTIAL) is None
    assert not transport.ended
    assert pool.keep(backend, taken.login, CREDENTIAL)  # its share is free again


def test_without_a_database_only_the_reset_is_sent(pool: BackendPool, backend: Backend) -> None:
    backend_leg, transport = kept(pool, backend, database=None)
    assert transport.written == frame(b"\x1f", 0)
    backend_leg.data_received(OK)
    assert pool.idle == 1


@pytest.mark.parametrize("answer", [
    frame(build_err(1049, "42000", "Unknown database 'test'"), 1),
    frame(b"\xfe", 1),
    b"",  # the server hung up
])
def test_anything_but_ok_closes_the_connection(pool: BackendPool, backend: Backend,
                                               answer: bytes) -> None:
    backend_leg, transport = kept(pool, backend)
    backend_leg.data_received(OK)
    if answer:
        backend_leg.data_received(answer)
    else:
        backend_leg.connection_lost(None)
    assert transport.ended == "aborted"
    assert pool.idle == 0 and pool.events[KEPT] == 0
    kept(pool, backend)
    kept(pool, backend)  # both of its shares are free


def test_a_word_from_the_server_while_kept_closes_it(pool: BackendPool,
                                                     backend: Backend) -> None:
    backend_leg, transport = kept(pool, backend)
    backend_leg.data_received(OK + OK)
    assert pool.idle == 1
    backend_leg.data_received(frame(build_err(4031, "HY000", "timeout"), 0))
    assert transport.ended == "aborted" and pool.idle == 0
    assert pool.take(backend, KEY, CREDENTIAL) is None


def test_a_backend_keeps_at_most_its_share(pool: BackendPool, backend: Backend) -> None:
    kept(pool, backend)
    kept(pool, backend)
    backend_leg, transport = leg()
    assert not pool.keep(backend, PoolLogin(KEY, backend_leg, GREETING, b"", 0, 0.0), CREDENTIAL)
    assert transport.written == b"" and backend_leg.session is None


def test_sweep_closes_what_expired_left_or_no_longer_fits(pool: BackendPool,
                                                          backend: Backend) -> None:
    router = Router()
    router.backends[backend.addr] = backend
    legs = [kept(pool, backend) for _ in range(2)]
    for backend_leg, _ in legs:
        backend_leg.data_received(OK + OK)
    assert pool.idle == 2
    pool.configure(1, 30.0)  # a reload made it smaller: the oldest goes
    pool.sweep(router, legs[1][0].session.since)  # type: ignore[union-attr]
    assert pool.idle == 1 and legs[0][1].ended == "closed"
    assert legs[0][1].written.endswith(b"\x01\x00\x00\x00\x01")  # COM_QUIT first
    backend.keep_unfit = "init_connect is set"  # a health check found one: a reset would not run it
    assert pool.take(backend, KEY, CREDENTIAL) is None
    assert legs[1][1].ended == "aborted" and pool.idle == 0
    backend.keep_unfit = ""
    backend_leg, transport = kept(pool, backend)
    backend_leg.data_received(OK + OK)
    # A second past backend-pool-idle: `since + 30.0 - since` may round to just under 30.
    pool.sweep(router, backend_leg.session.since + 31.0)  # type: ignore[union-attr]
    assert transport.ended == "closed" and pool.idle == 0
