"""The statement scan and the response rewrite behind the proxy's connection ids in SQL."""

from __future__ import annotations

from tiproxy.protocol.codec import lenenc_bytes
from tiproxy.protocol.packets import build_eof, frame
from tiproxy.session.connid import ResultRewriter, find_id_uses, might_name_ids, rewrite

MORE = 0x0008


def test_connection_id_becomes_the_proxy_id_outside_strings_and_comments() -> None:
    sql = b"SELECT connection_id( ), 'CONNECTION_ID()' /* CONNECTION_ID() */, `connection_id()`"
    uses = find_id_uses(sql)
    assert uses is not None and len(uses.connection_ids) == 1 and not uses.processlist
    out = rewrite(sql, uses, 42)
    assert out.sql == (b"SELECT 0000000042, 'CONNECTION_ID()' /* CONNECTION_ID() */, "
                       b"`connection_id()`")
    assert out.renames == ((b"0000000042", b"connection_id( )"),)


def test_names_that_only_look_alike_are_left() -> None:
    for sql in (b"SELECT my_connection_id()", b"SELECT db.connection_id()",
                b"SELECT connection_idx()", b"SELECT 'processlist'", b"SELECT 1 -- connection_id()"):
        assert find_id_uses(sql) is None, sql


def test_executable_comments_are_code() -> None:
    uses = find_id_uses(b"SELECT /*! CONNECTION_ID() */")
    assert uses is not None and uses.connection_ids


def test_is_used_lock_maps_holders_and_keeps_its_argument_whole() -> None:
    sql = b"SELECT IS_USED_LOCK(CONCAT('a', ')')) = CONNECTION_ID()"
    uses = find_id_uses(sql)
    assert uses is not None and len(uses.lock_calls) == 1 and uses.needs_holders
    out = rewrite(sql, uses, 7, {301: 9})
    assert out.sql == (b"SELECT CASE IS_USED_LOCK(CONCAT('a', ')')) WHEN 301 THEN 9 ELSE "
                       b"IS_USED_LOCK(CONCAT('a', ')')) END = 0000000007")
    assert dict(out.renames)[b"0000000007"] == b"CONNECTION_ID()"
    # Nobody holds a lock: the call stays as it is.
    assert rewrite(b"SELECT IS_USED_LOCK('x')", find_id_uses(b"SELECT IS_USED_LOCK('x')"),  # type: ignore[arg-type]
                   7, {}).sql == b"SELECT IS_USED_LOCK('x')"


def test_a_processlist_read_keeps_connection_id_for_its_where() -> None:
    sql = b"SELECT ID FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()"
    uses = find_id_uses(sql)
    assert uses is not None and uses.processlist and not uses.show_processlist
    out = rewrite(sql, uses, 5)
    assert out.sql == sql and out.id_names == (b"CONNECTION_ID()",)
    show = find_id_uses(b"  show full processlist")
    assert show is not None and show.show_processlist


def test_the_cheap_look_finds_every_case() -> None:
    assert might_name_ids(b"select Connection_Id()".lower())
    assert might_name_ids(b"SHOW PROCESSLIST".lower())
    assert not might_name_ids(b"select c from sbtest1 where id=5")


def _column(name: bytes, org_table: bytes = b"", org_name: bytes = b"", table: bytes = b"",
            schema: bytes = b"") -> bytes:
    strings = (b"def", schema, table, org_table, name, org_name)
    return b"".join(lenenc_bytes(s) for s in strings) + b"\x0c" + b"\x3f\x00" + b"\x0a\x00\x00\x00" \
        + b"\x08\x20\x00\x00\x00\x00"


def _row(*values: bytes | None) -> bytes:
    return b"".join(b"\xfb" if v is None else lenenc_bytes(v) for v in values)


def _packets(payloads: list[bytes]) -> bytes:
    return b"".join(frame(p, i + 1) for i, p in enumerate(payloads))


def _payloads(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 3], "little")
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def test_result_names_and_processlist_ids_are_rewritten_byte_by_byte() -> None:
    i_s = b"information_schema"
    payloads = [b"\x04", _column(b"ID", b"PROCESSLIST", b"ID", schema=i_s),
                _column(b"0000000042"), _column(b"USER", b"PROCESSLIST", b"USER", schema=i_s),
                _column(b"id", b"processlist", b"id", schema=b"app"),  # a table of the user's
                build_eof(0),
                _row(b"301", b"42", b"app", b"301"), _row(b"17", b"42", None, b"17"),
                build_eof(0)]
    rewriter = ResultRewriter(((b"0000000042", b"CONNECTION_ID()"),), {301: 42},
                              show_processlist=False, binary=False, prepare=False,
                              deprecate_eof=False)
    data = _packets(payloads)
    out = b"".join(rewriter.feed(data[i:i + 1]) for i in range(len(data)))  # byte by byte
    got = _payloads(out)
    assert got[2] == _column(b"CONNECTION_ID()")
    assert got[6] == _row(b"42", b"42", b"app", b"301")  # app.processlist's id is data
    assert got[7] == _row(b"17", b"42", None, b"17")  # not a proxy session: the backend's id
    assert got[:2] == payloads[:2] and got[8] == payloads[8]
    assert rewriter.done
    assert rewriter.feed(b"later") == b"later"


def test_show_processlist_and_a_second_result() -> None:
    # With DEPRECATE_EOF: no EOF after the definitions, the rows end with an OK (0xFE).
    payloads = [b"\x01", _column(b"Id"), _row(b"5"), b"\xfe\x00\x00" + (MORE).to_bytes(2, "little")
                + b"\x00\x00", b"\x01", _column(b"Id"), _row(b"5"),
                b"\xfe\x00\x00\x00\x00\x00\x00"]
    rewriter = ResultRewriter((), {5: 1005}, show_processlist=True, binary=False, prepare=False,
                              deprecate_eof=True)
    got = _payloads(rewriter.feed(_packets(payloads)))
    assert got[2] == _row(b"1005") and got[6] == _row(b"1005")
    assert rewriter.done


def test_prepare_ok_column_names() -> None:
    prepare_ok = b"\x00" + (9).to_bytes(4, "little") + (1).to_bytes(2, "little") \
        + (1).to_bytes(2, "little") + b"\x00\x00\x00"
    payloads = [prepare_ok, _column(b"?"), build_eof(0), _column(b"0000000042"), build_eof(0)]
    rewriter = ResultRewriter(((b"0000000042", b"CONNECTION_ID()"),), None,
                              show_processlist=False, binary=True, prepare=True,
                              deprecate_eof=False)
    got = _payloads(rewriter.feed(_packets(payloads)))
    assert got[1] == _column(b"?") and got[3] == _column(b"CONNECTION_ID()")
    assert rewriter.done


def test_an_error_or_a_malformed_packet_passes_untouched() -> None:
    err = b"\xff\x7a\x04#42000bad"
    rewriter = ResultRewriter(((b"x", b"y"),), None, show_processlist=False, binary=False,
                              prepare=False, deprecate_eof=True)
    assert rewriter.feed(frame(err, 1)) == frame(err, 1)
    broken = ResultRewriter(((b"x", b"y"),), None, show_processlist=False, binary=False,
                            prepare=False, deprecate_eof=True)
    data = _packets([b"\x01", b"\xfc"])  # a column definition cut short
    assert broken.feed(data) == data


def test_a_cursor_execute_ends_the_rewrite_with_its_definitions() -> None:
    """Its rows come later, with COM_STMT_FETCH: the rewriter is done after the EOF."""
    payloads = [b"\x01", _column(b"0000000042"), build_eof(0x0040)]  # CURSOR_EXISTS
    rewriter = ResultRewriter(((b"0000000042", b"CONNECTION_ID()"),), None,
                              show_processlist=False, binary=True, prepare=False,
                              deprecate_eof=False, cursor=True)
    got = _payloads(rewriter.feed(_packets(payloads)))
    assert got[1] == _column(b"CONNECTION_ID()")
    assert rewriter.done


def test_stored_definitions_keep_their_calls() -> None:
    """A view, routine, trigger, event or DEFAULT stores its text: the id is the caller's then."""
    for sql in (b"CREATE VIEW v AS SELECT * FROM jobs WHERE owner = CONNECTION_ID()",
                b"/* x */ create procedure p() select connection_id()",
                b"ALTER TABLE t ALTER c SET DEFAULT (CONNECTION_ID())"):
        assert find_id_uses(sql) is None, sql


def test_quoted_processlist_and_ids_inside_a_lock_argument() -> None:
    uses = find_id_uses(b"SELECT * FROM `information_schema`.`PROCESSLIST` "
                        b"WHERE ID = CONNECTION_ID()")
    assert uses is not None and uses.processlist
    sql = b"SELECT IS_USED_LOCK(CONCAT('job', CONNECTION_ID()))"
    uses = find_id_uses(sql)
    assert uses is not None
    assert rewrite(sql, uses, 5, {}).sql == b"SELECT IS_USED_LOCK(CONCAT('job', 0000000005))"
    assert rewrite(sql, uses, 5, {77: 5}).sql == (
        b"SELECT CASE IS_USED_LOCK(CONCAT('job', 0000000005)) WHEN 77 THEN 5 ELSE "
        b"IS_USED_LOCK(CONCAT('job', 0000000005)) END")


def test_a_progress_report_and_an_ok_terminator_with_counts() -> None:
    progress = b"\xff\xff\xff\x01\x00\x00\x00\x00"  # MariaDB's progress report, then the result
    ok_end = b"\xfe\x05\x00" + (0).to_bytes(2, "little") + b"\x00\x00"
    rewriter = ResultRewriter(((b"0000000042", b"CONNECTION_ID()"),), None,
                              show_processlist=False, binary=False, prepare=False,
                              deprecate_eof=True)
    got = _payloads(rewriter.feed(_packets([progress, b"\x01", _column(b"0000000042"),
                                            _row(b"42"), ok_end])))
    assert got[2] == _column(b"CONNECTION_ID()")
    assert rewriter.done
