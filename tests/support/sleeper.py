"""A statement that runs until it is killed, in a thread, and what it ended with."""

from __future__ import annotations

import threading
import time
from typing import Any

import pymysql


class SleepingQuery:
    """`SELECT SLEEP(seconds)` on `conn`, started at once; `wait()` says how it ended."""

    def __init__(self, conn: pymysql.connections.Connection[Any], seconds: int = 20) -> None:
        self.codes: list[int] = []  # the error it ended with, if any (an assert in the thread
        self.result: Any = None     # would not fail the test: the test checks these after)
        self._done = threading.Event()
        self._conn = conn
        self._seconds = seconds
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.5)  # the statement is running on the backend by then

    def _run(self) -> None:
        try:
            with self._conn.cursor() as cur:
                cur.execute(f"SELECT SLEEP({self._seconds})")
                self.result = cur.fetchall()
        except pymysql.err.Error as e:
            self.codes.append(e.args[0])
        finally:
            self._done.set()

    def wait(self, timeout: float = 10) -> bool:
        """True when the statement ended within `timeout` (it was interrupted)."""
        ended = self._done.wait(timeout)
        if ended:
            self._thread.join()
        return ended


class StatementThread(threading.Thread):
    """Any statement run in a thread (one that blocks, or whose backend a test kills while it
    runs): its rows, or the error the client saw."""

    def __init__(self, conn: Any, sql: str) -> None:
        super().__init__(daemon=True)
        self.conn, self.sql = conn, sql
        self.rows: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            with self.conn.cursor() as cur:
                cur.execute(self.sql)
                self.rows = cur.fetchall()
        except BaseException as e:  # what the client saw is the result
            self.error = e
