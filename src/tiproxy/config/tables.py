"""The config's tables of tables: labels of statically listed backends, and namespaces (which
users go to which backends), each decoded from TOML and checked as a whole (a backend in one
namespace only, a user in one namespace only), and the immutable map their values are held in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from tiproxy.config.values import ItemError, check_dial_addr, check_namespace_name


class FrozenMap(Mapping[str, str]):
    """An immutable, hashable and picklable str -> str mapping (unlike MappingProxyType, which
    cannot be pickled: configs will travel to worker processes)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items: dict[str, str] = dict(items or {})

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"


def decode_addr_list(raw: object) -> tuple[str, ...]:
    """TiProxy writes `pd-addrs` as one comma-separated string; a TOML list is accepted too."""
    if isinstance(raw, str):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        return tuple(raw)
    raise TypeError('a list of "host:port" strings')


@dataclass(frozen=True)
class BackendLabels:
    """Labels of one statically listed backend (TiDB's come from its topology instead)."""

    addr: str
    labels: Mapping[str, str]


def decode_backend_labels(raw: object) -> tuple[BackendLabels, ...]:
    """`[proxy.backend-labels]` "host:port" = { zone = "east" }."""
    if not isinstance(raw, dict):
        raise TypeError('a table of "host:port" = { label = "value" }')
    out = []
    for addr, labels in raw.items():
        try:
            check_dial_addr(addr)
        except ValueError as e:
            raise ItemError(f".{addr}", str(e)) from None
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise ItemError(f".{addr}", "expected a table of strings")
        out.append(BackendLabels(addr, FrozenMap(labels)))
    return tuple(out)


def encode_backend_labels(value: tuple[BackendLabels, ...]) -> dict[str, dict[str, str]]:
    return {b.addr: dict(b.labels) for b in value}


DEFAULT_NAMESPACE_NAME = "default"  # TiProxy's: users in no namespace; [proxy] backend-addrs


@dataclass(frozen=True)
class NamespaceConfig:
    """Ours, in the spirit of TiProxy's namespaces: these users go to these backends only."""

    name: str
    users: tuple[str, ...]
    backend_addrs: tuple[str, ...]


def decode_namespaces(raw: object) -> tuple[NamespaceConfig, ...]:
    """`[namespaces.NAME]` users = [...], backend-addrs = [...]."""
    if not isinstance(raw, dict):
        raise TypeError("a table of namespaces")
    out = []
    seen_users: set[str] = set()
    seen_addrs: dict[str, str] = {}
    for name, table in raw.items():
        try:
            check_namespace_name(name)
        except ValueError as e:
            raise ItemError(f".{name}", str(e)) from None
        if name == DEFAULT_NAMESPACE_NAME:
            raise ItemError(f".{name}", "the name of TiProxy's default namespace, which is "
                            "[proxy] backend-addrs: give this one another name")
        if not isinstance(table, dict) or set(table) - {"users", "backend-addrs"}:
            raise ItemError(f".{name}", "expected a table with users and backend-addrs")
        users, addrs = table.get("users", []), table.get("backend-addrs", [])
        for key, values in (("users", users), ("backend-addrs", addrs)):
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ItemError(f".{name}.{key}", "expected a list of strings")
        for i, addr in enumerate(addrs):
            try:
                check_dial_addr(addr)
            except ValueError as e:
                raise ItemError(f".{name}.backend-addrs[{i}]", str(e)) from None
            other = seen_addrs.setdefault(addr, name)
            if other != name or addrs.index(addr) != i:
                raise ItemError(f".{name}.backend-addrs[{i}]",
                                f"{addr} is in namespace {other!r} already")
        if not addrs:
            raise ItemError(f".{name}.backend-addrs", "a namespace needs backends")
        for user in users:
            if user in seen_users:
                raise ItemError(f".{name}.users", f"user {user!r} is in two namespaces")
            seen_users.add(user)
        out.append(NamespaceConfig(name, tuple(users), tuple(addrs)))
    return tuple(out)


def encode_namespaces(value: tuple[NamespaceConfig, ...]) -> dict[str, dict[str, list[str]]]:
    return {n.name: {"users": list(n.users), "backend-addrs": list(n.backend_addrs)}
            for n in value}
