"""MariaDB Connector/Python's workload, driven by tests/integration/test_connectors.py.

Usage: python workload.py   (TIPROXY_HOST, TIPROXY_PORT, TIPROXY_USER, TIPROXY_PASSWORD,
TIPROXY_DATABASE in the environment)

The connector is built on MariaDB Connector/C: its prepared cursors send a statement's parameter
types with the first execute only, executemany() becomes one COM_STMT_BULK_EXECUTE, and it has
COM_RESET_CONNECTION and COM_CHANGE_USER of its own. Each step's result goes to stdout as a line
`R <json>`; where the test may move the session the script writes `MOVE <connection id>` (or
`REDIRECT <id>`) and waits for `ok` on stdin (support/scripted.py).
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import json
import os
import sys
from typing import Any

import mariadb


def ask(what: str, conn_id: int) -> None:
    print(f"{what} {conn_id}", flush=True)
    if sys.stdin.readline().strip() != "ok":
        raise RuntimeError(f"the test did not answer {what}")


def plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    if isinstance(value, (decimal.Decimal, datetime.date, datetime.time, datetime.timedelta)):
        return f"{type(value).__name__} {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    return value


def out(step: str, value: Any) -> None:
    print("R " + json.dumps({"step": step, "value": plain(value)}), flush=True)


def main() -> None:
    env = os.environ
    conn = mariadb.connect(host=env["TIPROXY_HOST"], port=int(env["TIPROXY_PORT"]),
                           user=env["TIPROXY_USER"], password=env["TIPROXY_PASSWORD"],
                           database=env["TIPROXY_DATABASE"], autocommit=True)
    conn_id = conn.connection_id
    cur = conn.cursor()
    cur.execute("CREATE OR REPLACE TABLE py_m (id INT PRIMARY KEY, v VARCHAR(20), d DECIMAL(8,3), "
                "t DATETIME(6), b BLOB)")
    cur.execute("SET @m = 'moved', time_zone = '+05:30', sql_mode = 'ANSI_QUOTES,PIPES_AS_CONCAT'")
    # A prepared cursor for each statement (this connector crashes when one prepared cursor
    # goes from executemany() to another statement, with or without the proxy).
    bulk, ps, upd = (conn.cursor(prepared=True) for _ in range(3))
    rows = [(i, f"v{i}", decimal.Decimal(f"{i}.125"),
             datetime.datetime(2021, 2, 3, 4, 5, 6, i * 1000), bytes([0, i, 255])) for i in range(1, 6)]
    bulk.executemany("INSERT INTO py_m VALUES (?, ?, ?, ?, ?)", rows)
    out("bulk insert", bulk.rowcount)
    ps.execute("SELECT * FROM py_m WHERE id > ? ORDER BY id", (2,))
    out("prepared select", ps.fetchall())
    ask("MOVE", conn_id)
    ps.execute("SELECT * FROM py_m WHERE id > ? ORDER BY id", (3,))  # the same statement
    out("the same statement after a move", ps.fetchall())
    bulk.executemany("INSERT INTO py_m VALUES (?, ?, ?, ?, ?)",
                     [(6, None, None, None, None), (7, "seven", decimal.Decimal("-7.5"), None, b"")])
    out("bulk insert after a move", bulk.rowcount)
    cur.execute("SELECT @m, @@time_zone, @@sql_mode, DATABASE()")
    out("state after a move", cur.fetchall())
    conn.begin()
    upd.execute("UPDATE py_m SET v = ? WHERE id = ?", ("in tx", 1))
    ask("REDIRECT", conn_id)  # not in the middle of the transaction: after it
    upd.execute("UPDATE py_m SET v = ? WHERE id = ?", ("in tx", 2))
    conn.commit()
    cur.execute("SELECT id, v FROM py_m WHERE v = 'in tx' ORDER BY id")
    out("after the transaction", cur.fetchall())
    big = conn.cursor(buffered=False)
    big.execute("SELECT seq, REPEAT('x', 100) FROM seq_1_to_20000")
    digest = hashlib.sha1()
    count = 0
    for seq, pad in big:
        digest.update(f"{seq},{pad}\n".encode())
        count += 1
    big.close()
    out("unbuffered result", [count, digest.hexdigest()])
    ask("MOVE", conn_id)
    cur.execute("SELECT CAST('x' AS SIGNED)")
    cur.fetchall()
    cur.execute("SHOW WARNINGS")
    out("warnings", cur.fetchall())
    conn.reset()
    cur.execute("SELECT @m, @@time_zone, @@sql_mode = 'ANSI_QUOTES,PIPES_AS_CONCAT'")
    out("after COM_RESET_CONNECTION", cur.fetchall())
    ask("MOVE", conn_id)
    upd = conn.cursor(prepared=True)  # the reset closed the server's statements
    upd.execute("UPDATE py_m SET v = ? WHERE id = ?", ("after the reset", 3))
    out("a prepared statement after the reset and a move", upd.rowcount)
    conn.change_user(env["TIPROXY_USER"], env["TIPROXY_PASSWORD"], env["TIPROXY_DATABASE"])
    cur = conn.cursor()
    cur.execute("SELECT DATABASE(), CURRENT_USER() LIKE CONCAT(?, '@%')", (env["TIPROXY_USER"],))
    out("after COM_CHANGE_USER", cur.fetchall())
    ask("MOVE", conn_id)
    ps = conn.cursor(prepared=True)
    ps.execute("SELECT v FROM py_m WHERE id = ?", (7,))
    out("moved after COM_CHANGE_USER", ps.fetchall())
    conn.close()


if __name__ == "__main__":
    main()
