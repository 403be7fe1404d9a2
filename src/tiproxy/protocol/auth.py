"""Authentication plugins' arithmetic, for the logins the proxy makes itself.

mysql_native_password: the client sends SHA1(password) XOR SHA1(salt + SHA1(SHA1(password))).
Reference: https://mariadb.com/kb/en/connection/#mysql_native_password-plugin
"""

from __future__ import annotations

import hashlib

NATIVE_PLUGIN = "mysql_native_password"


def native_password_scramble(password: bytes, salt: bytes) -> bytes:
    if not password:
        return b""
    stage1 = hashlib.sha1(password).digest()  # noqa: S324 - the protocol's own hash
    stage2 = hashlib.sha1(stage1).digest()  # noqa: S324
    mix = hashlib.sha1(salt[:20] + stage2).digest()  # noqa: S324
    return bytes(a ^ b for a, b in zip(stage1, mix, strict=True))
