"""TiProxy's namespace routes: documents are staged by PUT and DELETE, and applied by commit.

Routes (TiProxy's, pkg/server/api/namespace.go), documents as config/namespaces.py maps them:
- `GET /api/admin/namespace/`: every namespace, a JSON list of documents;
- `GET /api/admin/namespace/{name}`: one document (404 if there is none);
- `PUT /api/admin/namespace/{name}` (or `PUT /api/admin/namespace/` with the name in the
  document): stage a document; a document we cannot honour is refused here (400, its key);
- `DELETE /api/admin/namespace/{name}`: stage its removal ("default" cannot be removed);
- `POST /api/admin/namespace/commit`: apply the staged changes: all of them, or those of the
  names in `?namespace=a&namespace=b` (TiProxy's server) or `?namespaces=a,b` (what TiProxy's
  tiproxyctl sends).

Theory of operation: the documents listed are the running config's namespaces with the staged
changes laid over them, as TiProxy lists its store rather than what it runs. A commit turns the
resulting namespaces into a partial config and applies it exactly as `PUT /api/admin/config`
applies one (the same merge, checks and online apply, under the same lock), so what one route
refuses the other refuses too, and `config get` shows the committed namespaces. A refused
commit changes nothing and keeps the staged changes; an applied one forgets them. Staged
changes live in this process only: a restart forgets them, as it forgets committed ones that
were not written to the config file (see the README).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tiproxy.config import Config, ConfigError, config_checksum
from tiproxy.config.namespaces import (
    DEFAULT_NAME,
    Namespace,
    NamespaceError,
    check_name,
    config_change,
    parse_document,
    running_namespaces,
)

PREFIX = "/api/admin/namespace"
# Staged changes are kept until a commit; a caller must not grow them without bound.
MAX_STAGED = 1024

ChangeConfig = Callable[[Callable[[Config], str]], Awaitable[Config]]
Handler = Callable[[web.Request], Awaitable[web.Response]]


class NamespaceRoutes:
    """The routes and the staged changes of one API server."""

    def __init__(self, config: Callable[[], Config], change_config: ChangeConfig) -> None:
        self._config = config
        self._change_config = change_config  # api/server.py's, as PUT /api/admin/config
        self.staged: dict[str, Namespace | None] = {}  # name -> its document, None: removed

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", PREFIX, self._list),
            ("PUT", PREFIX, self._put),
            ("POST", f"{PREFIX}/commit", self._commit),
            ("GET", PREFIX + "/{namespace}", self._get),
            ("PUT", PREFIX + "/{namespace}", self._put),
            ("DELETE", PREFIX + "/{namespace}", self._delete),
        ]

    def view(self) -> dict[str, Namespace]:
        """The running namespaces with the staged changes over them."""
        namespaces = running_namespaces(self._config())
        for name, staged in self.staged.items():
            if staged is None:
                namespaces.pop(name, None)
            else:
                namespaces[name] = staged
        return namespaces

    async def _list(self, _request: web.Request) -> web.Response:
        return _json([ns.document() for ns in self.view().values()])

    async def _get(self, request: web.Request) -> web.Response:
        name = request.match_info["namespace"]
        found = self.view().get(name)
        if found is None:
            return _error(f"namespace {name!r} not found", 404)
        return _json(found.document())

    async def _put(self, request: web.Request) -> web.Response:
        try:
            raw = json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return _error("the body is too large", 413)
        except ValueError as e:  # not UTF-8, or not JSON
            return _error(f"the body is not a JSON namespace document: {e}", 400)
        try:
            ns = parse_document(raw, request.match_info.get("namespace", ""))
        except NamespaceError as e:
            return _error(str(e), 400)
        refused = self._stage(ns.name, ns)
        return refused or _json({"namespace": ns.name, "staged": "put"})

    async def _delete(self, request: web.Request) -> web.Response:
        name = request.match_info["namespace"]
        if name == DEFAULT_NAME:
            return _error("the default namespace cannot be removed: it takes the users no other "
                          "namespace names (put it with other instances instead)", 400)
        if name not in self.view():
            return _error(f"namespace {name!r} not found", 404)
        refused = self._stage(name, None)
        return refused or _json({"namespace": name, "staged": "delete"})

    def _stage(self, name: str, ns: Namespace | None) -> web.Response | None:
        if name not in self.staged and len(self.staged) >= MAX_STAGED:
            return _error(f"{MAX_STAGED} namespace changes are staged already: commit them", 400)
        self.staged[name] = ns
        return None

    async def _commit(self, request: web.Request) -> web.Response:
        try:
            names = self._names_to_commit(request)
        except NamespaceError as e:
            return _error(str(e), 400)
        unknown = [n for n in names if n not in self.staged and n not in self.view()]
        if unknown:
            return _error(f"namespace {unknown[0]!r} not found", 404)
        committing = {n: self.staged[n] for n in names if n in self.staged}
        if not committing:
            return _json({"committed": [], "config_checksum": config_checksum(self._config())})

        def change(running: Config) -> str:
            namespaces = running_namespaces(running)
            for name, staged in committing.items():
                if staged is None:
                    namespaces.pop(name, None)
                else:
                    namespaces[name] = staged
            return config_change(namespaces.values())

        try:
            cfg = await self._change_config(change)
        except ConfigError as e:
            return _error(str(e), 400)
        for name, staged in committing.items():
            if self.staged.get(name, staged) == staged:  # unless staged again meanwhile
                self.staged.pop(name, None)
        return _json({"committed": sorted(committing), "config_checksum": config_checksum(cfg)})

    def _names_to_commit(self, request: web.Request) -> list[str]:
        """The names a commit names, or every staged one."""
        names = list(request.query.getall("namespace", []))
        for listed in request.query.getall("namespaces", []):
            names += [n for n in listed.split(",") if n]
        for name in names:
            check_name(name)
        return list(dict.fromkeys(names)) if names else list(self.staged)


def _json(body: Any) -> web.Response:
    return web.json_response(body, dumps=lambda obj: json.dumps(obj, indent=2))


def _error(reason: str, status: int) -> web.Response:
    return web.json_response({"error": reason}, status=status)
