"""COM_CHANGE_USER: a second login on the session's backend connection, relayed as the first
one is (the backend's auth switch forced, and its salt handed on), with what the proxy keeps of
it: the new user, and the new SHA1(password) when it can recover one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tiproxy.protocol.auth import native_answer
from tiproxy.protocol.codec import U32
from tiproxy.protocol.errors import ProtocolError
from tiproxy.protocol.packets import connect_attribute, frame, parse_auth_switch
from tiproxy.session.commands import rewrite_change_user
from tiproxy.session.login import FORCE_SWITCH_PLUGIN

if TYPE_CHECKING:
    from tiproxy.net.pool import PoolLogin
    from tiproxy.net.server import ProxyServer
    from tiproxy.protocol.packets import HandshakeResponse
    from tiproxy.session.state import SessionState

_unpack_u32 = U32.unpack_from


class ChangeUser:
    """Mixed into Session (net/relay.py), whose attributes it uses."""

    # Provided by Session and its other mixins.
    server: ProxyServer
    user: str
    dialect: str
    client_caps: int
    login_response: HandshakeResponse | None
    state: SessionState
    client_salt: bytes | None
    _native_salt: bytes | None
    _native_exchange: tuple[bytes, bytes] | None
    _switch_salt: tuple[bytes, str] | None
    _changing_to: str | None
    _pool_login: PoolLogin | None

    if TYPE_CHECKING:  # provided by Session and its other mixins: for the type checker only
        def _to_backend(self, packet: bytes) -> None: ...
        def _take_credential(self) -> None: ...
        def variables_reset(self) -> None: ...

    def _change_user_command(self, packet: bytes) -> tuple[bytes, Any]:
        """The client's COM_CHANGE_USER as the backend gets it (its plugin replaced, so that
        the backend switches to the user's own), and the token its answer is recorded by."""
        change = rewrite_change_user(packet[4:], self.client_caps, FORCE_SWITCH_PLUGIN)
        self._changing_to = change.user.decode("utf-8", "replace")
        return frame(change.rewritten, 0), ("change_user", self._changing_to)

    def _change_user_auth(self, packet: bytes) -> None:
        """A client packet in the middle of COM_CHANGE_USER's authentication: the answer to a
        switch whose salt the proxy replaced is answered to the backend's own salt, from the
        SHA1(password) it proves (a wrong password goes on as it came, for the server to
        refuse)."""
        if self._native_salt is not None:
            self._native_exchange = (self._native_salt, packet[4:])
            self._native_salt = None
        switched, self._switch_salt = self._switch_salt, None
        if switched is not None and self._native_exchange is not None:
            salt, answer = self._native_exchange
            stage1 = self.server.credentials.recover(switched[1], salt, answer) if answer \
                else None
            if stage1 is not None:
                packet = frame(native_answer(stage1, switched[0]), packet[3])
        self._to_backend(packet)

    def _watch_auth_switch(self, data: bytes) -> bytes:
        """COM_CHANGE_USER: note a native-password salt, to recover the new credential. A salt
        the client never saw (the backend is not the one it logged in to) is replaced by the
        one it answered last, when the proxy holds the new user's hash to answer the backend's
        (_change_user_auth): Connector/C answers with its old salt whatever the switch says."""
        if len(data) <= 5 or data[4] != 0xFE:
            return data
        length = _unpack_u32(data, 0)[0] & 0xFFFFFF
        try:
            switch = parse_auth_switch(data[4 : 4 + length])
        except ProtocolError:
            return data
        native = switch.plugin == "mysql_native_password"
        salt = switch.data[:20] if native else None
        self._native_salt = salt
        mine, change = self.client_salt, self._changing_to
        if salt is None or mine is None or len(salt) != len(mine) or salt == mine \
                or change is None or not self.server.credentials.knows(change) \
                or len(data) != length + 4 or not self._answers_login_salt():
            return data
        self._switch_salt = (salt, change)
        self._native_salt = mine
        at = 4 + 1 + len(switch.plugin) + 1  # header, 0xFE, the plugin's name and its NUL
        return data[:at] + mine + data[at + len(mine):]

    def _answers_login_salt(self) -> bool:
        """Whether the client is Connector/C (libmariadb, MySQL's libmysql), which answers a
        COM_CHANGE_USER's auth switch with its login's salt: any other answers the switch's,
        which the proxy then leaves alone (a stale stored hash cannot fail its answer)."""
        response = self.login_response
        name = connect_attribute(response.attrs, b"_client_name") if response else None
        return name in (b"libmariadb", b"libmysql")

    def _user_changed(self, user: str, failed: bool) -> None:
        self._changing_to = self._switch_salt = None
        self._pool_login = None  # another login's user, character set, attributes: not kept
        self.variables_reset()
        if failed:
            self._native_exchange = None
            if self.dialect != "tidb":
                # MariaDB keeps the old user but has reset the session all the same.
                self.state.reset()
            return
        self.user = user
        self.state.reset()  # (MariaDB keeps the current role: so does role_set)
        self.state.database_known = False  # the new login named its own database, if any
        self._take_credential()
