"""What a response says (outcome.py): the same figures from the captured bytes and from a
replaying client's packets, whatever EOF framing each negotiated. Packets are built as the
server sends them (https://dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_command_phase.html)."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiproxy.protocol.codec import U16, U32, lenenc_bytes, lenenc_int
from tiproxy.protocol.constants import MAX_PAYLOAD, ServerStatus
from tiproxy.protocol.packets import build_eof, build_err, build_ok, frame
from tiproxy.protocol.responses import Expect
from tiproxy.traffic.outcome import (
    Outcome,
    OutcomeReader,
    _sum_rows_py,
    expect_of,
    packets,
    sum_rows,
    summary_of,
)

AUTO = ServerStatus.AUTOCOMMIT
MORE = ServerStatus.MORE_RESULTS_EXISTS
NO_INDEX = ServerStatus.NO_INDEX_USED
QUERY = b"\x03SELECT"


def column(name: bytes, type_code: int) -> bytes:
    return b"".join((lenenc_bytes(b"def"), lenenc_bytes(b"db"), lenenc_bytes(b"t"),
                     lenenc_bytes(b"t"), lenenc_bytes(name), lenenc_bytes(name), b"\x0c",
                     U16.pack(45), U32.pack(11), bytes((type_code,)), U16.pack(0), b"\x00",
                     b"\x00\x00"))


def text_row(*values: bytes | None) -> bytes:
    return b"".join(b"\xfb" if v is None else lenenc_bytes(v) for v in values)


def result_set(columns: list[tuple[bytes, int]], rows: list[bytes], status: int,
               deprecate_eof: bool) -> list[bytes]:
    out = [lenenc_int(len(columns)), *(column(n, t) for n, t in columns)]
    if not deprecate_eof:
        out.append(build_eof(status))
    out += rows
    out.append(build_ok(status, header=0xFE) if deprecate_eof else build_eof(status))
    return out


def wire(payloads: list[bytes]) -> bytes:
    return b"".join(frame(p, i + 1) for i, p in enumerate(payloads))


def fed(payloads: list[bytes], packet: bytes, deprecate_eof: bool) -> Outcome:
    reader = OutcomeReader(expect_of(packet), deprecate_eof)
    done = [reader.feed(p) for p in payloads]
    assert done[-1] and not any(done[:-1])
    return reader.outcome


ROWS = [text_row(b"1", b"a"), text_row(b"2", None)]
COLUMNS = [(b"id", 3), (b"v", 0xFD)]


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_a_result_set_gives_rows_and_a_checksum_independent_of_the_eof_framing(
        deprecate_eof: bool) -> None:
    payloads = result_set(COLUMNS, ROWS, AUTO | NO_INDEX, deprecate_eof)
    outcome = fed(payloads, QUERY, deprecate_eof)
    checksum = zlib.crc32(ROWS[1], zlib.crc32(ROWS[0], zlib.crc32(b"\x02")))
    types = zlib.crc32(b"\x03\xfd")
    assert outcome == Outcome(status=AUTO | NO_INDEX, rows=2, checksum=checksum, types=types)
    assert summary_of(wire(payloads), QUERY, deprecate_eof, False) == (None, 2, checksum, types)


def test_a_value_changes_the_checksum_and_a_column_type_the_types() -> None:
    def both(columns: list[tuple[bytes, int]], rows: list[bytes]) -> tuple[int | None, ...]:
        outcome = fed(result_set(columns, rows, AUTO, True), QUERY, True)
        return outcome.checksum, outcome.types

    base = both(COLUMNS, ROWS)
    bigint = both([(b"id", 8), (b"v", 0xFD)], ROWS)
    value = both(COLUMNS, [ROWS[0], text_row(b"2", b"")])
    assert bigint[0] == base[0] and bigint[1] != base[1]
    assert value[0] != base[0] and value[1] == base[1]
    assert both([(b"ID", 3), (b"w", 0xFD)], ROWS) == base  # names are not results


def test_ok_packets_add_up_their_rows_affected_over_several_results() -> None:
    payloads = [build_ok(AUTO | MORE, affected=2), *result_set(COLUMNS, ROWS[:1], AUTO | MORE,
                                                                False), build_ok(AUTO, 3)]
    outcome = fed(payloads, QUERY, False)
    assert (outcome.affected, outcome.rows, outcome.status) == (5, 1, AUTO)


def test_an_error_ends_the_response_even_inside_a_result_set() -> None:
    payloads = [lenenc_int(1), column(b"id", 3), build_eof(AUTO), text_row(b"1"),
                build_err(1317, "70100", "Query execution was interrupted")]
    outcome = fed(payloads, QUERY, False)
    assert (outcome.error, outcome.message, outcome.checksum) == (
        1317, "Query execution was interrupted", None)


def test_progress_reports_do_not_end_a_response() -> None:
    progress = b"\xff\xff\xff" + b"\x01\x01\x00\x00\x00\x00\x05stage"
    assert fed([progress, build_ok(AUTO, 4)], b"\x03ALTER", False).affected == 4


def test_prepare_ok_and_its_definitions() -> None:
    prepare_ok = b"\x00" + U32.pack(7) + U16.pack(1) + U16.pack(2) + b"\x00\x00\x00"
    for deprecate_eof in (False, True):
        eof = [] if deprecate_eof else [build_eof(AUTO)]
        payloads = [prepare_ok, column(b"?", 3), column(b"?", 3), *eof, column(b"x", 3), *eof]
        assert fed(payloads, b"\x16SELECT x FROM t WHERE a=? AND b=?",
                   deprecate_eof).prepared == (7, 1, 2)


def test_a_cursor_execute_ends_after_its_column_definitions() -> None:
    execute = b"\x17" + U32.pack(7) + b"\x01" + U32.pack(1)
    assert expect_of(execute) is Expect.CURSOR
    payloads = [lenenc_int(1), column(b"x", 3), build_eof(AUTO | ServerStatus.CURSOR_EXISTS)]
    assert fed(payloads, execute, False).rows == 0


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_cached_metadata_leaves_the_types_unknown_not_the_rows(deprecate_eof: bool) -> None:
    eof = [] if deprecate_eof else [build_eof(AUTO)]
    end = build_ok(AUTO, header=0xFE) if deprecate_eof else build_eof(AUTO)
    omitted = [lenenc_int(1) + b"\x00", *eof, text_row(b"1"), end]
    sent = [lenenc_int(1) + b"\x01", column(b"x", 3), *eof, text_row(b"1"), end]
    plain = [lenenc_int(1), column(b"x", 3), *eof, text_row(b"1"), end]
    outcomes = [fed(p, QUERY, deprecate_eof) for p in (omitted, sent, plain)]
    assert [(o.rows, o.types is None) for o in outcomes] == [(1, True), (1, False), (1, False)]
    assert len({o.checksum for o in outcomes}) == 1
    for payloads, outcome in zip((omitted, sent, plain), outcomes, strict=True):
        assert summary_of(wire(payloads), QUERY, deprecate_eof, False) == (
            None, 1, outcome.checksum, outcome.types)


def test_a_16_mib_row_is_joined_before_it_is_read() -> None:
    big = lenenc_bytes(b"x" * MAX_PAYLOAD)
    raw = wire([lenenc_int(1), column(b"x", 0xFC)]) + frame(big, 3) \
        + wire([build_ok(AUTO, header=0xFE)])
    assert [len(p) for p in packets(raw)][2] == len(big)
    assert summary_of(raw, QUERY, True, False) == (
        None, 1, zlib.crc32(big, zlib.crc32(b"\x01")), zlib.crc32(b"\xfc"))


def test_bytes_that_make_no_response_give_none() -> None:
    assert summary_of(b"\x05\x00\x00\x01\x00", QUERY, True, False) is None  # cut short
    assert summary_of(wire([lenenc_int(1)]), QUERY, True, False) is None  # incomplete


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(0, 2**32 - 1),
       st.sampled_from([b"", build_eof(AUTO), build_ok(AUTO, header=0xFE), b"\xff\x01\x02"]),
       st.integers(0, 12))
def test_the_compiled_row_sum_is_the_python_one(rows: list[bytes], crc: int, last: bytes,
                                                cut: int) -> None:
    data = wire([*rows, last] if last else rows)
    data = data[: len(data) - cut]  # rows cut short stop both the same way
    assert sum_rows(data, 0, crc) == _sum_rows_py(data, 0, crc)


def test_the_compiled_row_sum_over_long_runs_and_long_rows() -> None:
    rows = [bytes((i % 250,)) * 1000 for i in range(40)] + [b"\x01" * 20000, b"\x02" * 7]
    data = wire([*rows, build_ok(AUTO, header=0xFE)])
    assert sum_rows(data, 0, 7) == _sum_rows_py(data, 0, 7)
    assert sum_rows(data, 0, 7)[1] == len(rows)
