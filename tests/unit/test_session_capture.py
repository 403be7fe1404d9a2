"""The relay's capture hook (net/session_capture.py) as transcripts: commands taken, responses fed to
a real ResponseTracker, the records handed to a real sink. The session around it is only what the
hook reads of one (its id, capabilities, tracker, state); the state read of a session open before
the capture runs against real servers in tests/integration/test_traffic.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from tiproxy.net.session_capture import PASS, READY, WAITING, SessionCapture
from tiproxy.protocol.codec import lenenc_int
from tiproxy.protocol.constants import MAX_PAYLOAD, Capability, ServerStatus
from tiproxy.protocol.packets import build_eof, build_ok, frame
from tiproxy.protocol.responses import EXPECT_BY_COMMAND
from tiproxy.protocol.tracker import ResponseTracker
from tiproxy.session.state import SessionState
from tiproxy.traffic.sink import CaptureSink, Record

AUTO = ServerStatus.AUTOCOMMIT
IN_TRANS = ServerStatus.IN_TRANS


@dataclass
class _Session:
    """What the hook reads of net/relay.py's Session."""

    id: int = 7
    phase: int = 1
    backend_caps: int = Capability.DEPRECATE_EOF
    client_caps: int = Capability.PLUGIN_AUTH | Capability.SECURE_CONNECTION
    mariadb_caps: int = 0
    state: SessionState = field(default_factory=SessionState)
    tracker: Any = None
    held: set[str] = field(default_factory=set)

    def hold_input(self, reason: str) -> None:
        self.held.add(reason)


class Transcript:
    def __init__(self, fresh: bool, status: int = AUTO) -> None:
        self.records: list[Record] = []
        self.sink = CaptureSink(self._deliver)
        self.session = _Session()
        self.session.state.use(b"shop")
        self.session.tracker = ResponseTracker(True, self._done, status)
        self.hook = SessionCapture(self.sink, self.session, fresh)  # type: ignore[arg-type]

    def _deliver(self, batch: list[Record], size: int) -> bool:
        self.records += batch
        return True

    def _done(self, token: Any, status: int, failed: bool) -> None:
        self.hook.done(status, failed)

    def command(self, payload: bytes, *responses: bytes, fast: bool = True) -> bool:
        """Send a command the way the relay does; feed its response's packets, each chunk as it
        comes. False: the hook sent it down the slow path."""
        packet = frame(payload, 0)
        if fast:
            if not self.hook.take(packet):
                return False
        elif not self.hook.ready(packet):
            return False
        else:
            self.hook.sent()
        self.session.tracker.expect(EXPECT_BY_COMMAND[payload[0]], payload[0])
        for chunk in responses:
            self.hook.response(chunk)
            self.session.tracker.feed(chunk)
        return True

    def flushed(self) -> list[Record]:
        self.sink.flush()
        return self.records


def result(*rows: bytes, status: int = AUTO) -> bytes:
    column = b"\x03def\x00\x00\x00\x01x\x00\x0c\x3f\x00\x01\x00\x00\x00\x08\x81\x00\x00\x00\x00"
    packets = [lenenc_int(1), column, *rows, build_ok(status, header=0xFE)]
    return b"".join(frame(p, i + 1) for i, p in enumerate(packets))


def run(test: Any) -> Any:
    async def main() -> Any:
        return test()
    return asyncio.run(main())


def test_a_session_that_logs_in_during_the_capture_starts_with_its_database() -> None:
    def go() -> list[Record]:
        t = Transcript(fresh=True)
        t.command(b"\x03SELECT 1", result(b"\x011"))
        t.command(b"\x03UPDATE t SET a = 1", frame(build_ok(AUTO | IN_TRANS, 3), 1))
        t.hook.closed()
        return t.flushed()

    records = run(go)
    assert [r[2] for r in records] == [b"\x02shop", b"\x03SELECT 1", b"\x03UPDATE t SET a = 1",
                                        b"\x01"]
    init, select, update, quit_ = records
    assert init[3] == 0 and quit_[3] == 0  # no response of their own
    assert select[6] == result(b"\x011") and select[5] == AUTO
    assert update[5] == AUTO | IN_TRANS and update[6] == frame(build_ok(AUTO | IN_TRANS, 3), 1)
    assert [r[0] for r in records] == sorted(r[0] for r in records)
    assert len({r[0] for r in records}) == 4  # strictly later, whatever the clock says


def test_pipelined_responses_are_recorded_without_their_bytes() -> None:
    def go() -> list[Record]:
        t = Transcript(fresh=True)
        t.command(b"\x03SELECT 1")
        t.command(b"\x03SELECT 2")
        both = result(b"\x011") + result(b"\x012")
        t.hook.response(both)
        t.session.tracker.feed(both)  # one chunk holds both responses
        t.command(b"\x03SELECT 3", result(b"\x013"))  # alone again: its bytes are kept
        return t.flushed()[1:]

    first, second, third = run(go)
    assert (first[6], second[6], third[6]) == (None, None, result(b"\x013"))
    assert first[3] and second[3]  # their ends are known all the same


def test_what_is_not_written_as_sent() -> None:
    def go() -> list[Record]:
        t = Transcript(fresh=True)
        change_user = b"\x11app\x00\x14" + b"s" * 20 + b"inventory\x00\x21\x00" \
            + b"mysql_native_password\x00"
        t.command(change_user, frame(build_ok(AUTO), 1))
        t.command(b"\x03" + b"x" * (MAX_PAYLOAD - 1))  # 16 MiB: the rest would follow
        return t.flushed()[1:]

    reset, init_db, big = run(go)
    assert (reset[2], reset[6]) == (b"\x1f", None)  # no credential, nothing of the exchange
    assert init_db[2] == b"\x02inventory"
    assert big[2] == b""  # counted as filtered by the writer


def test_a_session_from_before_waits_for_a_safe_point_then_for_its_next_command() -> None:
    def go() -> tuple[list[int], list[Record], set[str]]:
        t = Transcript(fresh=False, status=AUTO | IN_TRANS)  # in a transaction
        states = [t.hook.state]
        t.command(b"\x03UPDATE t SET a = 1", frame(build_ok(AUTO | IN_TRANS, 1), 1))
        states.append(t.hook.state)
        t.command(b"\x03COMMIT", frame(build_ok(AUTO), 1))  # the transaction ends
        states.append(t.hook.state)
        warnings = b"\x03SHOW WARNINGS"
        assert not t.command(warnings)  # the slow path, please
        assert t.hook.ready(frame(warnings, 0))  # it reads diagnostics: it runs first
        states.append(t.hook.state)
        t.hook.sent()
        t.session.tracker.expect(EXPECT_BY_COMMAND[3], 3)
        t.session.tracker.feed(frame(build_eof(AUTO), 1))
        states.append(t.hook.state)  # uncaptured, and ready again
        return states, t.flushed(), t.session.held

    states, records, held = run(go)
    assert states == [WAITING, WAITING, READY, PASS, READY]
    assert records == []  # nothing before the state is read
    assert held == set()


def test_a_session_from_before_at_rest_is_ready_at_once() -> None:
    def go() -> SessionCapture:
        return Transcript(fresh=False).hook

    assert run(go).state == READY
