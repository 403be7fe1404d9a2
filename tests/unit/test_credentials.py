"""The users file: the forms an operator gets hashes in, and what is refused."""

from __future__ import annotations

import hashlib

import pytest

from tiproxy.protocol.auth import native_password_scramble
from tiproxy.session.credentials import CredentialStore, UsersFileError

# SHA1(SHA1("app-pass")), as mysql.user shows it
APP_HASH = "*3F57C84FDE4BBAB2C998F3A2D311684280BAE8E7"
SALT = b"0123456789abcdefghij"


@pytest.mark.parametrize("line", [f"app {APP_HASH}", f"app:{APP_HASH}", f"app\t{APP_HASH}",
                                  f"  app \t {APP_HASH}  # from the CLI"])
def test_each_form_of_a_line_gives_the_credential(line: str) -> None:
    store = CredentialStore()
    assert store.load_users(f"# users\n{line}\n".encode(), "users") == 1
    scramble = native_password_scramble(b"app-pass", SALT)
    stage1 = store.recover("app", SALT, scramble)
    assert stage1 == hashlib.sha1(b"app-pass").digest()  # SHA1(password): a reusable login
    assert store.recover("app", SALT, native_password_scramble(b"wrong", SALT)) is None


@pytest.mark.parametrize("line", ["app", APP_HASH, "app *ABC", "app\t"])
def test_a_bad_line_is_named_and_not_shown(line: str) -> None:
    with pytest.raises(UsersFileError) as info:
        CredentialStore().load_users(f"ok {APP_HASH}\n{line}\n".encode(), "users")
    assert str(info.value) == "users:2: expected `user *HEX41`"


def test_synced_accounts_with_limits_of_their_own_are_told_apart() -> None:
    """The sync's fourth column: 1 for an account with limits of its own, NULL where the server
    could not say (then it may have them); before any sync, every account may."""
    store = CredentialStore()
    assert store.own_limits("app")
    rows = [("app", "mysql_native_password", APP_HASH, "0"),
            ("capped", "mysql_native_password", APP_HASH, "1"),
            ("unknown", "mysql_native_password", APP_HASH, None),
            ("edu", "ed25519", "", "0")]
    assert store.replace_synced(rows) == 3  # ed25519's key is no password hash
    assert [store.own_limits(u) for u in ("app", "capped", "unknown", "edu")] == \
        [False, True, True, False]
    assert store.knows("edu") is False and store.knows("capped")
