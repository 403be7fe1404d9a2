"""Authentication plugins' arithmetic, for the logins the proxy makes itself.

mysql_native_password: the client sends SHA1(password) XOR SHA1(salt + SHA1(SHA1(password))).
Knowing the stored hash SHA1(SHA1(password)), the proxy recovers SHA1(password) from one login
and can answer any later salt with it: that is how a session logs in to another backend without
the password. ProxySQL and MaxScale do the same. SHA1(password) is as good as the password for
this protocol: it is kept in memory only, never logged, and compared in constant time.
Reference: https://mariadb.com/kb/en/connection/#mysql_native_password-plugin
"""

from __future__ import annotations

import hashlib
import hmac

NATIVE_PLUGIN = "mysql_native_password"


def native_password_scramble(password: bytes, salt: bytes) -> bytes:
    if not password:
        return b""
    stage1 = hashlib.sha1(password).digest()  # noqa: S324 - the protocol's own hash
    stage2 = hashlib.sha1(stage1).digest()  # noqa: S324
    mix = hashlib.sha1(salt[:20] + stage2).digest()  # noqa: S324
    return _xor20(stage1, mix)


def _xor20(a: bytes, b: bytes) -> bytes:
    """Two 20-byte strings XORed (as integers: a login's hot path does this)."""
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(20, "big")


def _sha1(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()  # noqa: S324 - the protocol's own hash


def parse_native_hash(auth_string: str) -> bytes | None:
    """The stored `*HEX` form of SHA1(SHA1(password)), as mysql.user holds it; None if not one."""
    text = auth_string.strip()
    if len(text) != 41 or not text.startswith("*"):
        return None
    try:
        return bytes.fromhex(text[1:])
    except ValueError:
        return None


def recover_stage1(scramble: bytes, salt: bytes, stored: bytes) -> bytes | None:
    """SHA1(password) from a client's scramble, if the stored hash confirms it; else None.

    scramble = SHA1(pw) XOR SHA1(salt + SHA1(SHA1(pw))), so SHA1(pw) = scramble XOR
    SHA1(salt + stored); it is right exactly when SHA1 of it equals the stored hash.
    """
    if len(scramble) != 20 or len(stored) != 20:
        return None
    mix = _sha1(salt[:20] + stored)
    stage1 = _xor20(scramble, mix)
    return stage1 if hmac.compare_digest(_sha1(stage1), stored) else None


def scramble_from_stage1(stage1: bytes, salt: bytes) -> bytes:
    """The mysql_native_password answer to `salt`, knowing SHA1(password)."""
    mix = _sha1(salt[:20] + _sha1(stage1))
    return _xor20(stage1, mix)


def native_answer(stage1: bytes, salt: bytes) -> bytes:
    """mysql_native_password's answer from a reusable credential: empty for a user without a
    password (whose credential is empty)."""
    return scramble_from_stage1(stage1, salt) if stage1 else b""
