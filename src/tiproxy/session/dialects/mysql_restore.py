"""The MySQL dialect's restore (MariaDB, MySQL): what a capture found, given back with SET.

Theory of operation
-------------------
A capture (session/dialects/mysql.py) fills a CapturedState. The new backend gets one SET
statement that assigns all of its variables, with literals that give back the same types:
integers as integers (unsigned through CAST), decimals through CAST with their scale, doubles
with an exponent, strings as hex literals with their character set and collation. The current
database goes in the login packet. SQL-level prepared statements are prepared again by their
original text, server-side ones by COM_STMT_PREPARE (see net/migration.py).

Everything the proxy sends is ASCII, so the new session's character set does not matter while
it parses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class UserVariable:
    name: bytes
    type: str  # INT, INT UNSIGNED, DECIMAL, DOUBLE, VARCHAR
    value: bytes | None  # text from USER_VARIABLES; for strings, filled by the second query
    collation: str | None = None


@dataclass
class CapturedState:
    database: bytes | None = None
    last_insert_id: int = 0
    system: list[tuple[str, str, bytes | None]] = field(default_factory=list)  # name, type, value
    user: list[UserVariable] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # SESSION_STATUS counters by name
    locks: list[bytes] = field(default_factory=list)  # named locks held (METADATA_LOCK_INFO)
    # Where the user variables were listed: "information_schema", "performance_schema", or ""
    # (read only by the names the session's statements used)
    user_listing: str = ""
    wait_timeout: float | None = None  # the session's, whether its own or the global one

    def strings(self) -> list[UserVariable]:
        """String variables, NULL ones too: a NULL keeps its character set."""
        return [v for v in self.user if v.type == "VARCHAR"]


def restore_sql(state: CapturedState, user_only: bool = False) -> str | None:
    """One SET statement that gives a new session the captured variables (`user_only`: the
    user variables alone, set again after PREPARE: MariaDB's PREPARE of `SET @v = ?` makes
    @v binary)."""
    parts = [f"SESSION {name} = {system_literal(vtype, value)}"
             for name, vtype, value in state.system if not user_only]
    parts += [f"{quoted_user_var(v.name)} = {_user_literal(v)}" for v in state.user]
    if user_only:
        return "SET " + ", ".join(parts) if parts else None
    if state.last_insert_id:
        parts.append(f"SESSION last_insert_id = {state.last_insert_id}")
    return "SET " + ", ".join(parts) if parts else None


def quoted_user_var(name: bytes) -> str:
    """A user variable as SQL names it."""
    # Backquoted: user variable names may hold anything; a backquote is doubled.
    text = name.decode("utf-8", "replace").replace("`", "``")
    return f"@`{text}`"


_NUMERIC_SYSTEM_TYPES = frozenset({"INT", "INT UNSIGNED", "BIGINT", "BIGINT UNSIGNED", "DOUBLE"})


def system_literal(vtype: str, value: bytes | None) -> str:
    """A system variable's value (of type `vtype`) as a SET statement gives it back."""
    if value is None:
        return "NULL"
    if vtype in _NUMERIC_SYSTEM_TYPES:
        text = value.decode("ascii")
        float(text)  # a number, or ValueError: never pass other text unquoted
        return text
    return f"_utf8mb4 X'{value.hex()}'"


# A NULL keeps its variable's type (SET @d = 1.5e0; SET @d = NULL leaves a DOUBLE).
_TYPED_NULLS = {"INT": "CAST(NULL AS SIGNED)", "INT UNSIGNED": "CAST(NULL AS UNSIGNED)",
                "DECIMAL": "CAST(NULL AS DECIMAL(65,0))", "DOUBLE": "CAST(NULL AS DOUBLE)"}


def _user_literal(var: UserVariable) -> str:
    value = var.value
    if value is None and var.type == "VARCHAR" and var.collation not in (None, "binary"):
        charset = var.collation.split("_", 1)[0]
        return f"CAST(NULL AS CHAR CHARACTER SET {charset}) COLLATE {var.collation}"
    if value is None:
        return _TYPED_NULLS.get(var.type, "NULL")
    text = value.decode("ascii", "replace")
    if var.type == "INT":
        return str(int(text))
    if var.type == "INT UNSIGNED":
        return f"CAST({int(text)} AS UNSIGNED)"
    if var.type == "DECIMAL":
        digits = text.lstrip("-")
        scale = len(digits.partition(".")[2])
        float(text)
        return f"CAST('{text}' AS DECIMAL(65,{scale}))"
    if var.type == "DOUBLE":
        float(text)
        return text if "e" in text.lower() else f"{text}e0"
    # A string: the hex of its bytes (from the second capture statement) and its collation.
    collation = var.collation or "binary"
    charset = "binary" if collation == "binary" else collation.split("_", 1)[0]
    literal = f"_{charset} X'{text}'"
    return literal if collation == "binary" else f"{literal} COLLATE {collation}"
