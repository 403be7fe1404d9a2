"""Surgery on binary-protocol commands: statement ids and parameter types.

After a move the backend knows a prepared statement by a new id; the client keeps the old one.
Every command that names a statement (COM_STMT_EXECUTE, FETCH, CLOSE, RESET, SEND_LONG_DATA)
carries the id in payload bytes 1..4, rewritten in place. A client sends the parameter types only
with the first COM_STMT_EXECUTE (new_params_bound_flag = 1); the new backend has never seen them,
so the first execute after a move gets them put back from what the proxy kept.
Reference: https://mariadb.com/kb/en/com_stmt_execute/
"""

from __future__ import annotations

from tiproxy.protocol.codec import U32, Buffer
from tiproxy.protocol.constants import MAX_PAYLOAD
from tiproxy.protocol.errors import ProtocolError

_HEADER = 4
# The statement id MariaDB reads as "the one prepared last" (Connector/C's execute_direct sends
# its COM_STMT_EXECUTE with it right behind the COM_STMT_PREPARE, before the answer).
LAST_PREPARED_ID = 0xFFFFFFFF


def packet_stmt_id(packet: Buffer) -> int:
    """The statement id of a statement command (a whole packet, header included)."""
    if len(packet) < _HEADER + 5:
        raise ProtocolError("statement command without a statement id")
    return int(U32.unpack_from(packet, _HEADER + 1)[0])


def with_stmt_id(packet: bytes, stmt_id: int) -> bytes:
    return packet[: _HEADER + 1] + U32.pack(stmt_id) + packet[_HEADER + 5 :]


def execute_types(packet: Buffer, params: int) -> tuple[int, bytes | None]:
    """(cursor flags, the parameter types if this execute sends them, else None)."""
    if len(packet) < _HEADER + 10:
        raise ProtocolError("COM_STMT_EXECUTE too short")
    flags = packet[_HEADER + 5]
    if not params:
        return flags, None
    bound_at = _HEADER + 10 + (params + 7) // 8
    if bound_at >= len(packet):
        raise ProtocolError("COM_STMT_EXECUTE without its parameters")
    if packet[bound_at] != 1:
        return flags, None
    types = bytes(packet[bound_at + 1 : bound_at + 1 + 2 * params])
    if len(types) != 2 * params:
        raise ProtocolError("COM_STMT_EXECUTE with truncated parameter types")
    return flags, types


def with_types(packet: bytes, params: int, types: bytes) -> bytes:
    """The same execute with new_params_bound_flag = 1 and `types`, if it had flag 0."""
    bound_at = _HEADER + 10 + (params + 7) // 8
    if not params or bound_at >= len(packet) or packet[bound_at] != 0:
        return packet
    payload_len = len(packet) - _HEADER + len(types)
    if payload_len >= MAX_PAYLOAD:
        return packet  # a 16 MiB execute: left as it is (a documented limit)
    body = packet[_HEADER:bound_at] + b"\x01" + types + packet[bound_at + 1 :]
    return U32.pack(len(body)) + body  # sequence id 0: a command
