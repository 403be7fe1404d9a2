"""TiProxy's namespace documents over our config, for `/api/admin/namespace` and tiproxyctl.

TiProxy describes a namespace with a document (lib/config/namespace.go), in TOML or JSON:

    namespace = "analytics"
    [frontend]
    user = "report"              # the user whose sessions it takes
    security = {}                # a TLS object
    [backend]
    instances = ["10.0.1.1:4000"]
    security = {}

Sessions of the user go to the instances; everyone else goes to the namespace "default". Our
config says the same with `[proxy] backend-addrs` and `[namespaces.NAME] users = [...],
backend-addrs = [...]`, so a document maps onto it:
- "default" is `[proxy] backend-addrs` (the backends of users in no namespace; etcd and DNS
  add theirs beside them). It names no user: it takes everyone no other namespace names.
- Any other name is `[namespaces.NAME]`: `frontend.user` is `users` and `backend.instances` is
  `backend-addrs`. `frontend.users` (ours) lists more than one user; `user` is then "".
What we cannot honour is refused by its dotted key with "not supported", never dropped: a
security object with anything set (TLS is the proxy's, `[security]`), `backend.selector-type`
(the balance policy chooses). A key TiProxy's document does not have is refused as unknown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import tomli_w

from tiproxy.config.model import Config
from tiproxy.config.tables import DEFAULT_NAMESPACE_NAME
from tiproxy.config.values import check_dial_addr, check_namespace_name

DEFAULT_NAME = DEFAULT_NAMESPACE_NAME  # TiProxy's namespace for the users no other one names
# TiProxy's TLS object (lib/config/security.go): every key is refused once set.
_TLS_KEYS = ("cert", "key", "ca", "min-tls-version", "cert-allowed-cn", "auto-certs",
             "rsa-key-size", "autocert-expire-duration", "skip-ca")
_TLS_OF = {"frontend": "server-tls", "backend": "sql-tls"}


class NamespaceError(ValueError):
    """A document is refused; `key` is the dotted key in it ("" for the whole document)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class Namespace:
    """One namespace as our config holds it."""

    name: str
    users: tuple[str, ...] = ()
    instances: tuple[str, ...] = ()

    def document(self) -> dict[str, Any]:
        """TiProxy's document (its JSON shape: empty TLS objects are `{}`)."""
        frontend: dict[str, Any] = {"user": self.users[0] if len(self.users) == 1 else ""}
        if len(self.users) > 1:
            frontend["users"] = list(self.users)
        frontend["security"] = {}
        return {"namespace": self.name, "frontend": frontend,
                "backend": {"instances": list(self.instances), "security": {}}}


def running_namespaces(cfg: Config) -> dict[str, Namespace]:
    """The namespaces of a config, "default" first, then in the config's order."""
    out = {DEFAULT_NAME: Namespace(DEFAULT_NAME, (), cfg.proxy.backend_addrs)}
    for ns in cfg.namespaces:
        out[ns.name] = Namespace(ns.name, ns.users, ns.backend_addrs)
    return out


def config_change(namespaces: Iterable[Namespace]) -> str:
    """A partial TOML config that makes `namespaces` (all of them, "default" included) the
    config's namespaces; config.merge_config checks it as any other change."""
    doc: dict[str, Any] = {"namespaces": {}}
    for ns in namespaces:
        if ns.name == DEFAULT_NAME:
            doc["proxy"] = {"backend-addrs": list(ns.instances)}
        else:
            doc["namespaces"][ns.name] = {"users": list(ns.users),
                                          "backend-addrs": list(ns.instances)}
    return tomli_w.dumps(doc)


def check_name(name: str) -> None:
    try:
        check_namespace_name(name)
    except ValueError as e:
        raise NamespaceError("namespace", str(e)) from None


def parse_document(raw: object, path_name: str = "") -> Namespace:
    """The Namespace a TiProxy document describes; NamespaceError naming the refused key.
    `path_name` is the name in the request's path, if any: the document may leave its name out,
    but may not name another."""
    doc = _table(raw, "")
    _known(doc, ("namespace", "frontend", "backend"), "")
    name = doc.get("namespace", "")
    if not isinstance(name, str):
        raise NamespaceError("namespace", "expected a string")
    if path_name and name and name != path_name:
        raise NamespaceError("namespace", f"the document names {name!r}, the path {path_name!r}")
    name = name or path_name
    check_name(name)
    frontend = _table(doc.get("frontend"), "frontend")
    _known(frontend, ("user", "users", "security"), "frontend.")
    backend = _table(doc.get("backend"), "backend")
    _known(backend, ("instances", "security", "selector-type"), "backend.")
    for side, table in (("frontend", frontend), ("backend", backend)):
        _refuse_tls(table.get("security"), side)
    if backend.get("selector-type"):
        raise NamespaceError("backend.selector-type",
                             "not supported: the proxy's [balance] policy chooses the backend")
    users = _users(frontend)
    instances = _instances(backend.get("instances"))
    if name == DEFAULT_NAME and users:
        raise NamespaceError("frontend.user", "not supported on the default namespace: it "
                             "takes every user that no other namespace names")
    if name != DEFAULT_NAME and not instances:
        raise NamespaceError("backend.instances", "a namespace needs backends (only the "
                             "default one may have none: pd-addrs and backend-dns add theirs)")
    return Namespace(name, users, instances)


def _table(raw: object, key: str) -> dict[str, Any]:
    if raw is None:  # left out, or Go's JSON for an empty value
        return {}
    if not isinstance(raw, dict):
        raise NamespaceError(key, "expected a table (a JSON object)")
    return raw


def _known(table: Mapping[str, Any], keys: tuple[str, ...], prefix: str) -> None:
    for key in table:
        if key not in keys:
            raise NamespaceError(f"{prefix}{key}", "unknown key")


def _refuse_tls(raw: object, side: str) -> None:
    table = _table(raw, f"{side}.security")
    for key, value in table.items():
        where = f"{side}.security.{key}"
        if key not in _TLS_KEYS:
            raise NamespaceError(where, "unknown key")
        if value:  # Go's zero values (TiProxy's own tiproxyctl may send them) mean unset
            raise NamespaceError(where, "not supported: TLS is the proxy's, not a namespace's "
                                 f"([security] {_TLS_OF[side]})")


def _users(frontend: Mapping[str, Any]) -> tuple[str, ...]:
    user = frontend.get("user", "")
    if not isinstance(user, str):
        raise NamespaceError("frontend.user", "expected a string")
    more = frontend.get("users") or []
    if not isinstance(more, list) or not all(isinstance(u, str) and u for u in more):
        raise NamespaceError("frontend.users", "expected a list of user names")
    users = [user] if user else []
    return tuple(dict.fromkeys(users + more))  # in order, each once


def _instances(raw: object) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise NamespaceError("backend.instances", 'expected a list of "host:port" strings')
    for i, addr in enumerate(raw):
        if not isinstance(addr, str):
            raise NamespaceError(f"backend.instances[{i}]", "expected a string")
        try:
            check_dial_addr(addr)
        except ValueError as e:
            raise NamespaceError(f"backend.instances[{i}]", str(e)) from None
    if len(set(raw)) != len(raw):
        raise NamespaceError("backend.instances", "lists a backend twice")
    return tuple(raw)
