"""SessionState's counts of what the session made, against the server's (SessionState.unseen)."""

from __future__ import annotations

from tiproxy.session.dialects.mysql import parse_capture
from tiproxy.session.state import SessionState
from tiproxy.session.statements import statement_effects

TEMP, PREP = "COM_CREATE_TEMPORARY_TABLE", "COM_PREPARE_SQL"


def test_what_the_proxy_saw_made_is_what_the_server_counted() -> None:
    state = SessionState()
    for sql in (b"CREATE TEMPORARY TABLE a (x INT); CREATE TEMPORARY TABLE b (x INT)",
                b"PREPARE s FROM 'SELECT 1'", b"PREPARE s FROM 'SELECT 2'",
                b"EXECUTE IMMEDIATE 'CREATE TEMPORARY TABLE c (x INT)'"):
        state.apply(statement_effects(sql))
    assert state.temp_tables == {"a", "b", "c"}
    assert state.unseen({TEMP: 3, PREP: 2}) == ""
    # Counted by the server, never seen by the proxy: made inside a stored program.
    assert "a temporary table made" in state.unseen({TEMP: 4, PREP: 2})
    assert state.unseen({TEMP: 3, PREP: 3}).startswith("a prepared statement made")
    assert "reset the connection" in state.unseen({TEMP: 4, PREP: 3})
    # A server that does not count (no such status variables) is not second-guessed.
    assert state.unseen({}) == ""
    state.reset()  # COM_RESET_CONNECTION: the server's counts start again too
    assert state.unseen({TEMP: 0, PREP: 0}) == ""


def test_the_capture_reads_the_counts() -> None:
    rows: list[list[bytes | None]] = [
        [b"db", None, b"74657374"], [b"lii", None, b"0"],
        [b"count", b"COM_CREATE_TEMPORARY_TABLE", b"2"], [b"count", b"com_prepare_sql", b"5"],
    ]
    assert parse_capture(rows).counts == {TEMP: 2, PREP: 5}
