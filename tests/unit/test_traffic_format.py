"""TiProxy's native traffic format: encoding, decoding by TiProxy's rules, Go string literals."""

from __future__ import annotations

import io

import pytest

from tiproxy.traffic.format import (
    Decoder,
    FormatError,
    TrafficCommand,
    encode,
    format_time,
    go_quote,
    go_unquote,
    parse_time,
)


class _Lines:
    """A format.Source over bytes in memory."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)
        self.line = 1

    def readline(self, limit: int) -> bytes:
        line = self._f.readline(limit)
        self.line += line.endswith(b"\n")
        return line

    def read(self, size: int) -> bytes:
        data = self._f.read(size)
        self.line += data.count(b"\n")
        return data

    def position(self) -> str:
        return f"mem, line {self.line}"


def decode_all(data: bytes) -> list[TrafficCommand]:
    decoder = Decoder(_Lines(data))
    out = []
    while (c := decoder.next()) is not None:
        out.append(c)
    return out


def test_a_query_is_written_as_tiproxy_writes_it() -> None:
    c = TrafficCommand(1_724_915_045_123_456_789, 7, b"\x03SELECT 1")
    assert encode(c) == (b"# Time: 2024-08-29T07:04:05.123456789Z\n# Conn_ID: 7\n"
                         b"# Payload_len: 8\nSELECT 1\n")


def test_a_failed_execute_carries_its_statement_and_our_outcome_keys() -> None:
    c = TrafficCommand(1_724_915_045_000_000_000, 9, b"\x17\x01\x00\x00\x00\x00\x01\x00\x00\x00",
                       success=False, ps_id=1, prepared_sql=b"SELECT ?\n", query_ns=1500,
                       error_code=1146, status=2, rows=None, affected=None, checksum=0xAB)
    text = encode(c)
    assert text.startswith(b"# Time: 2024-08-29T07:04:05Z\n# Conn_ID: 9\n"
                           b"# Cmd_type: StmtExecute\n# Success: false\n# Captured_ps_id: 1\n"
                           b'# Prepared_stmt: "SELECT ?\\n"\n')
    assert b"# Query_time: 0.000001500\n# Error_code: 1146\n# Server_status: 2\n" in text
    assert b"# Result_checksum: 000000ab\n# Payload_len: 9\n" in text
    assert decode_all(text) == [TrafficCommand(
        1_724_915_045_000_000_000, 9, c.packet, False, 1, b"SELECT ?\n", 1500, 1146, 2,
        checksum=0xAB, where="mem, line 1")]


def test_binary_payloads_with_newlines_round_trip() -> None:
    commands = [TrafficCommand(10**18 + i, 3 + i % 2, bytes((0x17,)) + bytes(range(256)) * 3,
                               ps_id=5, rows=i, affected=0, types=i * 77) for i in range(4)]
    commands.append(TrafficCommand(10**18 + 9, 3, b"\x01"))  # a quit: empty payload
    decoded = decode_all(b"".join(encode(c) for c in commands))
    assert [(c.start_ns, c.conn_id, c.packet, c.rows, c.affected, c.types) for c in decoded] == \
        [(c.start_ns, c.conn_id, c.packet, c.rows, c.affected, c.types) for c in commands]


def test_keys_tiproxy_does_not_know_are_skipped_in_any_order() -> None:
    data = (b"# Conn_ID: 4\n# Future_key: anything at all\n# Time: 2024-01-19T16:29:48.141142Z\n"
            b"# Cmd_type: InitDB\n# Payload_len: 4\ntest\n")
    [c] = decode_all(data)
    assert (c.conn_id, c.packet, c.start_ns) == (4, b"\x02test", 1_705_681_788_141_142_000)


@pytest.mark.parametrize(("data", "reason"), [
    (b"# Conn_ID: 1\n# Payload_len: 1\nx\n", "no Time"),
    (b"# Time: 2024-01-19T16:29:48Z\n# Payload_len: 1\nx\n", "no connection id"),
    (b"# Time: 2024-01-19T16:29:48Z\n# Time: 2024-01-19T16:29:48Z\n", "given twice"),
    (b"# Time: 2024-01-19T16:29:48Z\n# Conn_ID: 1\n# Cmd_type: Bulk\n# Payload_len: 0\n\n",
     "unknown Cmd_type"),
    (b"# Time: 2024-01-19T16:29:48Z\n# Conn_ID: 1\n# Payload_len: 5\nab\n", "shorter"),
    (b"# Time: 2024-01-19T16:29:48Z\n# Conn_ID: 1\n# Payload_len: 1\nab\n", "newline"),
    (b"Time: now\n", "does not start"),
    (b"# Time:\n", "not a '# Key: value'"),
    (b"# Time: yesterday\n# Conn_ID: 1\n# Payload_len: 0\n\n", "RFC 3339"),
    (b"# Time: 2024-01-19T16:29:48Z\n# Conn_ID: -1\n# Payload_len: 0\n\n", "not a number"),
    (b"# Time: 2024-01-19T16:29:48Z\n# Conn_ID: 1\n", "ends inside"),
])
def test_a_malformed_file_is_refused_with_where_and_why(data: bytes, reason: str) -> None:
    with pytest.raises(FormatError, match=reason) as e:
        decode_all(data)
    assert "mem, line" in str(e.value)


def test_after_an_error_decoding_goes_on_at_the_next_command() -> None:
    good = encode(TrafficCommand(10**18, 2, b"\x03SELECT 2"))
    decoder = Decoder(_Lines(b"# Time: broken\n# Conn_ID: 1\n# Payload_len: 0\n\n" + good))
    with pytest.raises(FormatError):
        decoder.next()
    decoder.skip_to_next()
    c = decoder.next()
    assert c is not None and c.packet == b"\x03SELECT 2"
    assert decoder.next() is None


@pytest.mark.parametrize(("raw", "literal"), [
    # strconv.Quote's output for each (checked against Go's rules: \a \b \f \n \r \t \v, \xNN
    # for bytes that are not UTF-8 and for other control characters, \uNNNN above ASCII).
    (b"SELECT 'a'\n\t\"b\\", '"SELECT \'a\'\\n\\t\\"b\\\\"'),
    (b"\x00\x07\x7f", '"\\x00\\a\\x7f"'),
    ("café ☃".encode(), '"café ☃"'),
    (b"\xff\xfe", '"\\xff\\xfe"'),
    ("\u2028".encode(), '"\\u2028"'),
    ("\U000e0001".encode(), '"\\U000e0001"'),
])
def test_go_quoting(raw: bytes, literal: str) -> None:
    assert go_quote(raw) == literal
    assert go_unquote(literal) == raw


def test_go_unquote_reads_every_escape_go_writes() -> None:
    assert go_unquote(r'"\101\x42\u0043\U00000044\'"') == b"ABCD'"
    for bad in ('"\\q"', '"abc', '"\\x4"', '"a"b"', '"\\400"'):
        with pytest.raises(ValueError):
            go_unquote(bad)


def test_times_keep_nanoseconds_and_read_any_offset() -> None:
    assert format_time(1_705_681_788_000_000_000) == "2024-01-19T16:29:48Z"
    assert format_time(1_705_681_788_100_000_000) == "2024-01-19T16:29:48.1Z"
    assert parse_time("2024-01-19T17:29:48.000000001+01:00") == 1_705_681_788_000_000_001
    assert parse_time("2024-01-19t11:29:48-05:00") == 1_705_681_788_000_000_000
