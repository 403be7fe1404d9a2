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
