"""The proxy's own statements on a detached backend connection, with their results read whole.

Used to log in as the proxy, and by migrations to capture and restore session state. Small
results only: everything is held in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tiproxy.client.leg import BackendLeg
from tiproxy.protocol.codec import U16, U32, read_lenenc_bytes, read_lenenc_int
from tiproxy.protocol.constants import MAX_PAYLOAD, Command, ServerStatus
from tiproxy.protocol.errors import Origin, ProtocolError, SQLError
from tiproxy.protocol.packets import frame, parse_err
from tiproxy.protocol.responses import terminator_status

Row = list[bytes | None]


@dataclass
class Result:
    rows: list[Row]
    status: int
    types: list[tuple[int, int]] = field(default_factory=list)  # (column type, flags) each


def sql_error(payload: bytes) -> SQLError:
    err = parse_err(payload)
    return SQLError(err.code, err.sqlstate, err.message, Origin.BACKEND)


async def query(leg: BackendLeg, sql: str | bytes, deprecate_eof: bool,
                extended_metadata: bool = False) -> Result:
    """Run one statement; its rows as text values (a statement without rows gives []).
    `extended_metadata`: the connection negotiated MariaDB's extended type info."""
    return (await queries(leg, [sql], deprecate_eof, extended_metadata))[0]


async def queries(leg: BackendLeg, sqls: Sequence[str | bytes], deprecate_eof: bool,
                  extended_metadata: bool = False) -> list[Result]:
    """Several statements sent at once and answered in order: one round trip. The first
    statement's error is raised once every answer has been read (the leg stays in step)."""
    for sql in sqls:
        body = sql.encode() if isinstance(sql, str) else sql
        leg.write(frame(bytes((Command.QUERY,)) + body, 0))
    results: list[Result] = []
    error: SQLError | None = None
    for _ in sqls:
        try:
            result = await read_result(leg, deprecate_eof, extended_metadata)
            while result.status & ServerStatus.MORE_RESULTS_EXISTS:
                result = await read_result(leg, deprecate_eof, extended_metadata)
            results.append(result)
        except SQLError as e:
            error = error or e
    if error is not None:
        raise error
    return results


async def read_payload(leg: BackendLeg) -> bytes:
    """One logical packet's payload: one of 16 MiB - 1 bytes goes on in the next packet (a row
    that holds a large user variable, read by a checkpoint or a move)."""
    _, payload = await leg.read_packet()
    if len(payload) < MAX_PAYLOAD:
        return payload
    parts = [payload]
    while len(payload) == MAX_PAYLOAD:
        _, payload = await leg.read_packet()
        parts.append(payload)
    return b"".join(parts)


async def read_result(leg: BackendLeg, deprecate_eof: bool,
                      extended_metadata: bool = False) -> Result:
    _, payload = await leg.read_packet()
    while payload[:3] == b"\xff\xff\xff":  # MariaDB progress reports before the answer
        _, payload = await leg.read_packet()
    first = payload[0] if payload else -1
    if first == 0x00:
        return Result([], terminator_status(payload, 0, len(payload)))
    if first == 0xFF:
        raise sql_error(payload)
    if first in (-1, 0xFB, 0xFE):
        raise ProtocolError("unexpected response to the proxy's statement", Origin.BACKEND)
    columns, _ = read_lenenc_int(payload, 0)
    types = [column_type((await leg.read_packet())[1], extended_metadata)
             for _ in range(columns)]
    if not deprecate_eof:
        await leg.read_packet()
    rows: list[Row] = []
    while True:
        payload = await read_payload(leg)
        if payload[:1] == b"\xfe" and len(payload) < MAX_PAYLOAD:
            return Result(rows, terminator_status(payload, 0, len(payload)), types)
        if payload[:1] == b"\xff":
            raise sql_error(payload)
        rows.append(text_row(payload, columns))


def column_type(payload: bytes, extended_metadata: bool = False) -> tuple[int, int]:
    """(type, flags) of a ColumnDefinition41: six length-encoded strings (catalog, schema,
    table, org_table, name, org_name), MariaDB's extended type info (one more length-encoded
    block) when negotiated, the fixed-field length, charset (2), length (4), then type (1) and
    flags (2). https://mariadb.com/kb/en/result-set-packets/#column-definition-packet
    """
    pos = 0
    for _ in range(7 if extended_metadata else 6):
        _, pos = read_lenenc_bytes(payload, pos)
    _, pos = read_lenenc_int(payload, pos)
    if pos + 9 > len(payload):
        raise ProtocolError("column definition too short", Origin.BACKEND)
    return payload[pos + 6], U16.unpack_from(payload, pos + 7)[0]


def text_row(payload: bytes, columns: int) -> Row:
    row: Row = []
    pos = 0
    for _ in range(columns):
        if pos < len(payload) and payload[pos] == 0xFB:
            row.append(None)
            pos += 1
        else:
            value, pos = read_lenenc_bytes(payload, pos)
            row.append(value)
    return row


@dataclass
class Prepared:
    stmt_id: int
    columns: int
    params: int


def send_prepare(leg: BackendLeg, sql: bytes) -> None:
    leg.write(frame(bytes((Command.STMT_PREPARE,)) + sql, 0))


async def read_prepare(leg: BackendLeg, deprecate_eof: bool) -> Prepared:
    """The response to a COM_STMT_PREPARE (several may be in flight, answered in order)."""
    _, payload = await leg.read_packet()
    if payload[:1] == b"\xff":
        raise sql_error(payload)
    if payload[:1] != b"\x00" or len(payload) < 12:
        raise ProtocolError("malformed PREPARE_OK", Origin.BACKEND)
    stmt_id = U32.unpack_from(payload, 1)[0]
    columns = U16.unpack_from(payload, 5)[0]
    params = U16.unpack_from(payload, 7)[0]
    for count in (params, columns):
        for _ in range(count):
            await leg.read_packet()
        if count and not deprecate_eof:
            await leg.read_packet()
    return Prepared(stmt_id, columns, params)
