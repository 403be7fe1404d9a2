"""Statement text for traffic: digests that group statements, and two questions asked of them.

- `normalize` / `digest`: a statement with its literals replaced by `?` (lists of them by
  `(...)`), comments dropped, white space collapsed and words lower case; its digest is the
  SHA-256 of that text. `SELECT * FROM t WHERE id IN (1, 2, 3)` and `select * from t where id
  in (7)` share one digest, as TiDB's statement digests do; the normalizer is our own.
- `is_sensitive`: statements that may carry a password or a storage URL, which a capture never
  writes (TiProxy's list: CREATE/ALTER USER, SET PASSWORD, GRANT, BACKUP, RESTORE, IMPORT,
  LOAD DATA; and MariaDB's CHANGE MASTER, CREATE/ALTER SERVER, anything IDENTIFIED BY/VIA/WITH
  and PASSWORD()).
- `is_read_only`: what a `read-only` replay runs (TiProxy's rule): SELECT without FOR UPDATE,
  SHOW, WITH, USE, DESC, TABLE, DO, transactions' BEGIN / START TRANSACTION / COMMIT /
  ROLLBACK, and SET of session and user variables, names and character sets.
"""

from __future__ import annotations

import hashlib
import re

from tiproxy.session.statements import split_statements

_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<exec>/\*M?!\d*)                      # MariaDB / MySQL executable comment: kept
      | (?P<comment>/\*.*?(?:\*/|\Z)|--(?:\s[^\n]*|$)|\#[^\n]*)
      | (?P<string>'(?:[^'\\]|\\.|'')*(?:'|\Z)|"(?:[^"\\]|\\.|"")*(?:"|\Z))
      | (?P<ident>`(?:[^`]|``)*(?:`|\Z))
      | (?P<number>0x[0-9a-fA-F]+\b|[xXbB]'[0-9a-fA-F]*'|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
      | (?P<word>[^\W\d]\w*|@@?[\w.$]*|\$\w*)
      | (?P<close>\*/)                           # the end of an executable comment
      | (?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)
_SKIPPED = frozenset(("space", "comment", "exec", "close"))
_LIST = re.compile(r"\( \?(?: , \?)* \)")
_ROWS = re.compile(r"\(\.\.\.\)(?: , \(\.\.\.\))+")


def _tokens(sql: str) -> list[str]:
    out: list[str] = []
    for m in _TOKEN.finditer(sql):
        kind = m.lastgroup
        if kind in _SKIPPED:
            continue
        text = m.group()
        if kind in ("string", "number"):
            out.append("?")
        elif kind == "ident":
            out.append(text)
        else:
            out.append(text.lower())
    return out


def normalize(sql: str) -> str:
    text = " ".join(_tokens(sql))
    text = _LIST.sub("(...)", text)
    return _ROWS.sub("(...)", text)


def digest(sql: str) -> str:
    return hashlib.sha256(normalize(sql).encode()).hexdigest()


def text_of(sql: bytes) -> str:
    return sql.decode("utf-8", "replace")


def leading_words(sql: str, count: int) -> list[str]:
    """The statement's first `count` words, lower case, after white space and comments."""
    words: list[str] = []
    for m in _TOKEN.finditer(sql):
        if m.lastgroup in _SKIPPED:
            continue
        if m.lastgroup != "word":
            break
        words.append(m.group().lower())
        if len(words) == count:
            break
    return words


_SENSITIVE_STARTS = (
    ("create", "user"), ("create", "or", "replace", "user"), ("alter", "user"),
    ("set", "password"), ("grant",), ("backup",), ("restore",), ("import",), ("load", "data"),
    ("change", "master"), ("change", "replication"), ("create", "server"),
    ("create", "or", "replace", "server"), ("alter", "server"),
)
# Anywhere in the text, not only at a statement's start: after another statement of a
# multi-statement text, inside EXECUTE IMMEDIATE '...', PREPARE ... FROM '...' or a compound
# statement. PASSWORD(), OLD_PASSWORD() and ED25519_PASSWORD() take a password in clear.
_SECRET_WORDS = re.compile(
    r"\bidentified\s+(?:by|via|with)\b|password\s*\(|\bset\s+password\b|"
    r"\b(?:create|alter)\s+(?:or\s+replace\s+)?(?:user|server)\b|\bmaster_password\b|"
    r"\bchange\s+(?:master|replication)\b", re.IGNORECASE)


# Every sensitive statement holds one of these words: most statements are cleared by one search.
_HINTS = re.compile(rb"user|password|grant|backup|restore|import|load|master|replication|"
                    rb"server|identified")


def is_sensitive(sql: bytes) -> bool:
    if _HINTS.search(sql.lower()) is None:
        return False
    text = text_of(sql)
    if _SECRET_WORDS.search(text) is not None:
        return True
    for statement in split_statements(sql):  # (as the server splits a multi-statement text)
        words = tuple(leading_words(text_of(statement), 4))
        if any(words[: len(start)] == start for start in _SENSITIVE_STARTS):
            return True
    return False


_READ_ONLY_FIRST = frozenset(("show", "with", "use", "desc", "describe", "table", "do", "begin",
                              "commit", "rollback", "values"))
_SET_SESSION = frozenset(("session", "local", "names", "character", "charset", "transaction",
                          "session_states", "autocommit", "sql_mode", "time_zone"))


def is_read_only(sql: bytes) -> bool:
    text = text_of(sql)
    words = leading_words(text, 3)
    if not words:
        return False
    first = words[0]
    if first == "select":
        tail = normalize(text)
        return " for update" not in tail and " into outfile" not in tail \
            and " into dumpfile" not in tail
    if first in _READ_ONLY_FIRST:
        return True
    if first == "start":
        return words[1:2] == ["transaction"]
    if first == "set" and len(words) > 1:
        second = words[1]
        if second.startswith("@@"):
            return not second.startswith("@@global.")
        return second.startswith("@") or second in _SET_SESSION
    return False
