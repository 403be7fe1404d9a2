"""What a session records of its open transaction, to replay it elsewhere (no I/O here).

Theory of operation
-------------------
With `[proxy] transaction-replay = true`, every command answered while a transaction is open
(the server status says IN_TRANS after it) is kept with a CRC-32 of the answer the client got,
byte for byte as it was relayed: a replay sends the same commands again to a backend and goes on
only if every answer is the same (net/replay.py). The log starts with the command after which
the transaction was open (BEGIN, or the first statement under autocommit=0) and ends with the
one after which it is not (COMMIT, ROLLBACK, an implicit commit).

A transaction cannot be replayed faithfully, and its log says why, when: it recorded more than
its size limit (a bound on what a client can make the proxy keep); a statement in it assigned
variables (they are restored to what they were before, and running it again would change them
twice); it changed the current database (the earlier statements would run again in the new
one); it sent commands pipelined (their answers cannot be told apart) or a command the replay
does not send again (LOCAL INFILE data, a cursor fetch); or the proxy rewrote a statement's text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_LIMIT = 1 << 20


@dataclass
class TransactionLog:
    limit: int
    entries: list[tuple[bytes, int]] = field(default_factory=list)  # (command, answer's CRC)
    size: int = 0
    broken: str = ""  # why it cannot be replayed; "" while it can
    attempts: int = 0  # replays after deadlocks or lock wait timeouts

    def add(self, packet: bytes, crc: int) -> None:
        if self.broken:
            return
        self.size += len(packet)
        if self.size > self.limit:
            self.refuse(f"it recorded more than transaction-replay-max-size ({self.limit} bytes)")
            return
        self.entries.append((packet, crc))

    def refuse(self, why: str) -> None:
        if not self.broken:
            self.broken = why
            self.entries.clear()  # nothing of it will be sent again: keep nothing
