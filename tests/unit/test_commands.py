"""The commands the proxy reads before the backend sees them: KILL and COM_CHANGE_USER.

References: https://mariadb.com/kb/en/kill/ , https://mariadb.com/kb/en/com_change_user/ ,
https://mariadb.com/kb/en/comment-syntax/
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiproxy.protocol.codec import U32, lenenc_bytes, read_lenenc_bytes, read_nul_bytes
from tiproxy.protocol.constants import Capability, Command
from tiproxy.protocol.errors import ProtocolError
from tiproxy.session.commands import (
    MAYBE_KILL_FIRST_BYTES,
    KillExpression,
    KillRequest,
    is_unmapped_kill,
    parse_kill_query,
    parse_process_kill,
    prepared_kill,
    rewrite_change_user,
)

C = Capability

# -- KILL ------------------------------------------------------------------------------------

KILLS = {
    b"KILL 5": KillRequest(5, False, b"KILL "),
    b"kill query 5;": KillRequest(5, True, b"KILL QUERY "),
    b"KILL HARD CONNECTION 5": KillRequest(5, False, b"KILL HARD CONNECTION "),
    b"Kill Soft Query 12345678901": KillRequest(12345678901, True, b"KILL SOFT QUERY "),
    b"KILL CONNECTION 7 ;  ": KillRequest(7, False, b"KILL CONNECTION "),
    b"  \tKILL\n\r 9\n": KillRequest(9, False, b"KILL "),
    b"KILL HARD 3": KillRequest(3, False, b"KILL HARD "),
    # The server's whitespace includes vertical tab and form feed.
    b"\x0bKILL\x0c8": KillRequest(8, False, b"KILL "),
    # Comments hide nothing from the server, so they must hide nothing from the proxy.
    b"/* from the app */ KILL 5": KillRequest(5, False, b"KILL "),
    b"KILL /* which one */ QUERY 5": KillRequest(5, True, b"KILL QUERY "),
    b"KILL 5 -- done\n": KillRequest(5, False, b"KILL "),
    b"KILL 5 # done": KillRequest(5, False, b"KILL "),
    b"-- first\nKILL 5": KillRequest(5, False, b"KILL "),
    b"#first\nKILL QUERY 5;": KillRequest(5, True, b"KILL QUERY "),
    b"KILL 5 /* it's a quote in a comment */": KillRequest(5, False, b"KILL "),
    # Executable comments are run by the server.
    b"/*!KILL 6*/": KillRequest(6, False, b"KILL "),
    b"/*!50000 KILL QUERY 6 */": KillRequest(6, True, b"KILL QUERY "),
    b"/*M!100100 KILL 6 */": KillRequest(6, False, b"KILL "),
}

NOT_KILLS = [
    b"KILL QUERY ID 5",  # a query id, not a connection id
    b"kill query id 5;",
    b"KILL USER x",
    b"KILL USER 'app'@'%'",
    b"KILL CONNECTION_ID()",
    b"KILL 5, 6",
    b"KILL 5; SELECT 1",
    b"KILLQUERY 5",
    b"KILL",
    b"KILL -5",
    b"KILL 0x10",
    b"SELECT 'KILL 5'",
    b"SELECT 1 -- KILL 5",
    b"KILL 5 --x",  # "--" opens a comment only before whitespace
    b"/* KILL 5 */ SELECT 1",
    b"/* unterminated KILL 5",
    b"KILL '5'",
    b"",
]


@pytest.mark.parametrize("sql", sorted(KILLS))
def test_kill_matches(sql: bytes) -> None:
    assert parse_kill_query(sql) == KILLS[sql]


@pytest.mark.parametrize("sql", NOT_KILLS)
def test_not_a_kill_of_a_connection_id(sql: bytes) -> None:
    assert parse_kill_query(sql) is None


@pytest.mark.parametrize("sql", sorted(KILLS))
def test_every_kill_starts_with_a_byte_the_relay_checks(sql: bytes) -> None:
    """The relay passes a COM_QUERY straight on unless its first byte is in this set."""
    assert sql[0] in MAYBE_KILL_FIRST_BYTES


def test_kill_for_backend_keeps_the_options() -> None:
    req = parse_kill_query(b"kill hard query 5")
    assert req is not None
    assert req.for_backend(987654) == b"KILL HARD QUERY 987654"


_PAD = st.lists(
    st.sampled_from([b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c", b"/* c */", b"/**/", b"# c\n",
                     b"-- c\n", b"--\t\n"]),
    max_size=3,
).map(b"".join)  # fmt: skip
_SEP = st.lists(st.sampled_from([b" ", b"\t", b"\n", b"\x0c", b"/* x */ "]), min_size=1,
                max_size=3).map(b"".join)  # fmt: skip


@given(
    lead=_PAD,
    sep=_SEP,
    mode=st.sampled_from([b"", b"HARD", b"soft"]),
    what=st.sampled_from([b"", b"CONNECTION", b"query"]),
    conn_id=st.integers(0, 2**63),
    tail=_PAD,
    semicolon=st.booleans(),
)
def test_kill_grammar(
    *, lead: bytes, sep: bytes, mode: bytes, what: bytes, conn_id: int, tail: bytes, semicolon: bool
) -> None:
    words = [b"KILL", mode, what, str(conn_id).encode()]
    sql = lead + sep.join(w for w in words if w) + tail + (b";" if semicolon else b"")
    req = parse_kill_query(sql)
    assert req is not None, sql
    assert req.connection_id == conn_id
    assert req.query_only is (what.upper() == b"QUERY")
    assert sql[0] in MAYBE_KILL_FIRST_BYTES


@given(st.binary(max_size=64))
def test_kill_parser_takes_any_bytes(sql: bytes) -> None:
    req = parse_kill_query(sql)
    if req is not None:
        assert sql[0] in MAYBE_KILL_FIRST_BYTES


def test_process_kill_id() -> None:
    assert parse_process_kill(b"\x0c\xef\xbe\xad\xde") == 0xDEADBEEF


@pytest.mark.parametrize("payload", [b"\x0c", b"\x0c\x01\x02\x03"])
def test_process_kill_without_an_id(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_process_kill(payload)


# -- COM_CHANGE_USER ---------------------------------------------------------------------------

ATTRS = lenenc_bytes(lenenc_bytes(b"_client_name") + lenenc_bytes(b"pymysql"))
FULL = C.PROTOCOL_41 | C.SECURE_CONNECTION | C.PLUGIN_AUTH | C.CONNECT_ATTRS


def change_user(
    *,
    user: bytes = b"bob",
    auth: bytes = b"\x11" * 20,
    db: bytes = b"shop",
    charset: bytes | None = b"\xe0\x00",
    plugin: bytes | None = b"mysql_native_password",
    attrs: bytes | None = ATTRS,
    secure: bool = True,
) -> bytes:
    out = bytes((Command.CHANGE_USER,)) + user + b"\0"
    out += bytes((len(auth),)) + auth if secure else auth + b"\0"
    out += db + b"\0"
    for part in (charset, plugin + b"\0" if plugin is not None else None, attrs):
        if part is None:
            break
        out += part
    return out


def fields(payload: bytes, caps: int) -> dict[str, bytes]:
    """Read a COM_CHANGE_USER back, independently of the code under test."""
    assert payload[0] == Command.CHANGE_USER
    user, pos = read_nul_bytes(payload, 1)
    if caps & C.SECURE_CONNECTION:
        size = payload[pos]
        auth, pos = payload[pos + 1 : pos + 1 + size], pos + 1 + size
    else:
        auth, pos = read_nul_bytes(payload, pos)
    db, pos = read_nul_bytes(payload, pos)
    charset, pos = payload[pos : pos + 2], pos + 2
    plugin, pos = read_nul_bytes(payload, pos)
    out = {"user": user, "auth": auth, "db": db, "charset": charset, "plugin": plugin}
    if caps & C.CONNECT_ATTRS and pos < len(payload):
        start = pos
        _, pos = read_lenenc_bytes(payload, pos)
        out["attrs"] = payload[start:pos]
    out["rest"] = payload[pos:]
    return out


def test_change_user_rewrite_swaps_the_plugin_and_drops_the_auth_data() -> None:
    change = rewrite_change_user(change_user(), FULL, "tiproxy_pass_through")
    assert (change.user, change.database) == (b"bob", b"shop")
    assert fields(change.rewritten, FULL) == {
        "user": b"bob",
        "auth": b"",
        "db": b"shop",
        "charset": b"\xe0\x00",
        "plugin": b"tiproxy_pass_through",
        "attrs": ATTRS,
        "rest": b"",
    }


def test_change_user_without_secure_connection() -> None:
    caps = FULL & ~C.SECURE_CONNECTION
    payload = change_user(auth=b"oldscramble", secure=False)
    change = rewrite_change_user(payload, caps, "tiproxy_pass_through")
    got = fields(change.rewritten, caps)
    assert (got["user"], got["auth"], got["db"], got["plugin"]) == (
        b"bob", b"", b"shop", b"tiproxy_pass_through",
    )  # fmt: skip


def test_change_user_without_attributes_or_charset() -> None:
    caps = FULL & ~C.CONNECT_ATTRS
    change = rewrite_change_user(change_user(attrs=None), caps, "p")
    assert fields(change.rewritten, caps) == {
        "user": b"bob", "auth": b"", "db": b"shop", "charset": b"\xe0\x00", "plugin": b"p",
        "rest": b"",
    }  # fmt: skip
    # An old client that stops after the database gets utf8_general_ci (33).
    change = rewrite_change_user(change_user(charset=None, db=b""), caps, "p")
    got = fields(change.rewritten, caps)
    assert (got["db"], got["charset"], got["plugin"]) == (b"", b"\x21\x00", b"p")


def test_change_user_keeps_empty_database_and_unicode_user() -> None:
    user = "zoë".encode()
    change = rewrite_change_user(change_user(user=user, db=b""), FULL, "x")
    assert change.user == user
    assert change.database == b""
    assert fields(change.rewritten, FULL)["user"] == user


def test_change_user_from_a_client_without_plugin_auth() -> None:
    """It names no plugin (mysqljs); the backend leg, which has CLIENT_PLUGIN_AUTH, gets one."""
    old = FULL & ~(C.PLUGIN_AUTH | C.CONNECT_ATTRS)
    change = rewrite_change_user(change_user(plugin=None, attrs=None), old, "x")
    got = fields(change.rewritten, FULL)
    assert (got["user"], got["auth"], got["db"], got["charset"], got["plugin"], got["rest"]) == (
        b"bob", b"", b"shop", b"\xe0\x00", b"x", b"")


def test_change_user_truncated() -> None:
    payload = change_user()
    user_end = payload.index(b"\0") + 1
    db_end = payload.index(b"shop\0") + 5
    for cut in range(db_end):
        with pytest.raises(ProtocolError):
            rewrite_change_user(payload[:cut], FULL, "x")
    assert cut > user_end
    # Within the optional tail: a charset cut short, a plugin without its NUL, attributes cut short.
    for cut in (db_end + 1, db_end + 5, len(payload) - 3):
        with pytest.raises(ProtocolError):
            rewrite_change_user(payload[:cut], FULL, "x")


def test_process_kill_id_is_little_endian() -> None:
    assert parse_process_kill(b"\x0c" + U32.pack(42)) == 42


@pytest.mark.parametrize(
    ("sql", "unmapped"),
    [
        (b"KILL 4+1", True),
        (b"KILL '5'", True),
        (b"KILL (5)", True),
        (b"kill 0x5", True),
        (b"/* c */ KILL 3+1", True),
        (b"KILL 5", False),
        (b"KILL USER app", False),
        (b"KILL QUERY ID 5", False),
        (b"KILL HARD QUERY ID 5", False),
        (b"SELECT 'KILL 4+1'", False),
    ],
)
def test_kill_the_proxy_cannot_map_is_recognised(sql: bytes, unmapped: bool) -> None:
    assert is_unmapped_kill(sql) is unmapped


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        (b"KILL 5", KillRequest),
        (b"KILL QUERY 5;", KillRequest),
        (b"KILL @v + 1", KillExpression),
        (b"KILL CONNECTION (SELECT 1 FROM t)", KillExpression),
        (b"KILL ?", type(None)),  # a parameter: refused when prepared
        (b"KILL @v + ?", type(None)),
        (b"KILL CONCAT('1', '\\\\0')", type(None)),  # a backslash: refused when prepared
        (b"KILL USER app", type(None)),  # the backend's to run
        (b"SELECT 'KILL 4+1'", type(None)),
    ],
)
def test_a_prepared_kill_is_what_each_execute_carries_out(sql: bytes, kind: type) -> None:
    assert type(prepared_kill(sql)) is kind
