"""Stored password hashes, by user, and recovering a reusable credential from a login.

Sources: `[security] users-file` (lines `user *HEX`, as `SELECT User, authentication_string
FROM mysql.user` gives them; `#` starts a comment) and the backends themselves, read by the
account `[security] auth-sync-user` (see control/cluster.py). A user may have several hashes
(one account per host pattern); the one that verifies wins.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from tiproxy.protocol.auth import NATIVE_PLUGIN, parse_native_hash, recover_stage1


class UsersFileError(ValueError):
    pass


# (users file hashes, synced hashes, users with limits of their own), by user name ...
# ... and the backend the synced ones were read from.
CredentialSnapshot = tuple[dict[str, set[bytes]], dict[str, set[bytes]], set[str], str]


class CredentialStore:
    def __init__(self) -> None:
        self._file: dict[str, set[bytes]] = {}
        self._synced: dict[str, set[bytes]] = {}
        self._limited: set[str] = set()
        self.synced_from = ""  # the backend (address) the last sync read

    def load_users(self, data: bytes, origin: str) -> int:
        """Replace the hashes of the users file with those in `data` (its content; `origin`
        names it in errors); returns how many it held. Raises UsersFileError, naming the line
        but never showing it (it holds a hash)."""
        hashes: dict[str, set[bytes]] = {}
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UsersFileError(f"{origin}: not UTF-8 text") from None
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            # "user *HEX", "user:*HEX" or the mariadb CLI's tab-separated output
            fields = line.replace(":", " ", 1).rsplit(None, 1)
            user, auth = fields if len(fields) == 2 else ("", "")
            parsed = parse_native_hash(auth)
            if not user.strip() or parsed is None:
                raise UsersFileError(f"{origin}:{number}: expected `user *HEX41`")
            hashes.setdefault(user.strip(), set()).add(parsed)
        self._file = hashes
        return sum(len(v) for v in hashes.values())

    def replace_synced(self, rows: Iterable[tuple[str, str, str, str | None]],
                       origin: str = "") -> int:
        """Rows of (user, plugin, authentication_string, limited) read from a backend: limited
        is "1" for an account with limits of its own (control/cluster.py), None where the
        server could not say."""
        hashes: dict[str, set[bytes]] = {}
        limited: set[str] = set()
        for user, plugin, auth, limits in rows:
            parsed = parse_native_hash(auth) if plugin in (NATIVE_PLUGIN, "") else None
            if parsed is not None:
                hashes.setdefault(user, set()).add(parsed)
            if limits != "0":  # (None: unknown)
                limited.add(user)
        self._synced = hashes
        self._limited = limited
        self.synced_from = origin
        return sum(len(v) for v in hashes.values())

    def own_limits(self, user: str) -> bool:
        """Whether an account of this name may have limits of its own, as far as the last sync
        could tell: a statement time (a reset connection has the global one instead) or a cap
        on its connections (a kept connection counts toward it, a login on one is not counted);
        net/pool.py keeps no connection of such an account."""
        return user in self._limited or not self._synced

    def knows(self, user: str) -> bool:
        return user in self._file or user in self._synced

    def recover(self, user: str, salt: bytes, scramble: bytes) -> bytes | None:
        """SHA1(password) for this login, or None when no stored hash verifies it."""
        for stored in self._file.get(user, set()) | self._synced.get(user, set()):
            stage1 = recover_stage1(scramble, salt, stored)
            if stage1 is not None:
                return stage1
        return None

    def verifies(self, user: str, credential: bytes) -> bool | None:
        """Whether a session's SHA1(password) still matches a stored hash of its user: None
        where no hash of the user is stored (an account of another plugin, a users-file that
        does not list it), so nothing can be told."""
        stored = self._file.get(user, set()) | self._synced.get(user, set())
        if not stored or not credential:  # (an empty password has no stored hash to match)
            return None
        mine = hashlib.sha1(credential).digest()  # noqa: S324 - the protocol's own hash
        return any(hmac.compare_digest(mine, hashed) for hashed in stored)

    def snapshot(self) -> CredentialSnapshot:
        """Every stored hash, for a worker process to hold the same (workers/messages.py)."""
        return self._file, self._synced, self._limited, self.synced_from

    def restore(self, snapshot: CredentialSnapshot) -> None:
        self._file, self._synced, self._limited, self.synced_from = snapshot
