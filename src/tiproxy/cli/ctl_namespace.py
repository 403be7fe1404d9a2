"""`tiproxyctl namespace ...`: TiProxy's namespace commands, over /api/admin/namespace.

    namespace list                 every namespace, as TOML documents keyed by name
    namespace get NAME             one namespace's TOML document
    namespace put [--ns FILE]      stage a TOML document (standard input without --ns)
    namespace import DIR           stage every *.toml document in DIR
    namespace del NAME             stage a namespace's removal
    namespace commit [NAME...]     apply the staged changes (all, or those of the names)

Documents are TiProxy's (`namespace`, `[frontend] user`, `[backend] instances`; see
config/namespaces.py for how they map onto the config). Files are read here and sent as JSON,
as TiProxy's tiproxyctl sends them, every key included: the proxy refuses the keys it cannot
honour by name. `import` reads every file first and sends none if one does not parse.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from tiproxy.cli.apiclient import CtlError, Target, get, request
from tiproxy.config.files import CONFIG_FILE_LIMIT, FileRefusedError, read_small_file

if TYPE_CHECKING:
    from tiproxy.cli.ctl import _Commands

PREFIX = "/api/admin/namespace"
MAX_IMPORT_FILES = 1024  # the proxy stages at most this many changes anyway


def add_commands(commands: _Commands) -> None:
    commands.add("list", "print every namespace (TOML)", _list)
    get_one = commands.add("get", "print one namespace (TOML)", _get)
    get_one.add_argument("name", metavar="NAME")
    put = commands.add("put", "stage a namespace document (TOML; standard input without --ns)",
                       _put)
    put.add_argument("--ns", metavar="FILE", help="the namespace's TOML file")
    imports = commands.add("import", "stage every *.toml namespace document of a directory",
                           _import)
    imports.add_argument("directory", metavar="DIR")
    delete = commands.add("del", "stage the removal of a namespace", _delete)
    delete.add_argument("name", metavar="NAME")
    commit = commands.add("commit", "apply the staged namespace changes (of NAMEs, else all)",
                          _commit)
    commit.add_argument("names", metavar="NAME", nargs="*")


def _list(args: argparse.Namespace) -> int:
    documents = get(args.target, PREFIX).json()
    if not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents):
        raise CtlError(f"the API answered {PREFIX} with something other than a list")
    _print_toml({str(d.get("namespace")): d for d in documents})
    return 0


def _get(args: argparse.Namespace) -> int:
    document = get(args.target, f"{PREFIX}/{_quoted(args.name)}").json()
    if not isinstance(document, dict):
        raise CtlError(f"the API answered {PREFIX}/{args.name} with something other than "
                       "a document")
    _print_toml(document)
    return 0


def _put(args: argparse.Namespace) -> int:
    where = f"--ns {args.ns}" if args.ns else "standard input"
    document = _parse(_read(args.ns) if args.ns else _stdin(), where)
    print(_send(args.target, document, where))
    return 0


def _import(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    try:
        files = sorted(p for p in directory.iterdir() if p.suffix == ".toml")
    except OSError as e:
        raise CtlError(f"{args.directory}: {e.strerror}") from None
    if len(files) > MAX_IMPORT_FILES:
        raise CtlError(f"{args.directory}: more than {MAX_IMPORT_FILES} .toml files")
    documents = [(str(path), _parse(_read(str(path)), str(path))) for path in files]
    for where, document in documents:
        print(f"- file: {where}\n{_send(args.target, document, where)}")
    if not documents:
        print(f"{args.directory}: no .toml files")
    return 0


def _delete(args: argparse.Namespace) -> int:
    request(args.target, f"{PREFIX}/{_quoted(args.name)}", method="DELETE")
    print(f"namespace {args.name}: removal staged; `tiproxyctl namespace commit` applies it")
    return 0


def _commit(args: argparse.Namespace) -> int:
    # TiProxy's tiproxyctl sends the names this way; the proxy also takes ?namespace=a&...
    query = f"?namespaces={_quoted(','.join(args.names))}" if args.names else ""
    body = request(args.target, f"{PREFIX}/commit{query}", method="POST").json()
    committed = body.get("committed") if isinstance(body, dict) else None
    checksum = body.get("config_checksum") if isinstance(body, dict) else None
    if not committed:
        print("nothing staged to commit")
    else:
        print(f"committed {', '.join(map(str, committed))} (config checksum {checksum})")
    return 0


def _send(target: Target, document: dict[str, Any], where: str) -> str:
    name = document.get("namespace")
    if not isinstance(name, str) or not name:
        raise CtlError(f"{where}: the document has no namespace name (namespace = \"...\")")
    body = json.dumps(document, default=str).encode()  # a TOML date is refused as a string
    request(target, f"{PREFIX}/{_quoted(name)}", method="PUT", data=body,
            content_type="application/json")
    return f"namespace {name}: staged; `tiproxyctl namespace commit` applies it"


def _read(path: str) -> bytes:
    try:
        return read_small_file(path, CONFIG_FILE_LIMIT)
    except FileRefusedError as e:
        raise CtlError(f"{path}: {e}") from None


def _stdin() -> bytes:
    data = sys.stdin.buffer.read(CONFIG_FILE_LIMIT + 1)
    if len(data) > CONFIG_FILE_LIMIT:
        raise CtlError(f"the document on standard input is over {CONFIG_FILE_LIMIT} bytes")
    return data


def _parse(data: bytes, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CtlError(f"{where}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise CtlError(f"{where}: invalid TOML: {e}") from None


def _print_toml(document: dict[str, Any]) -> None:
    print(tomli_w.dumps(document), end="")


def _quoted(name: str) -> str:
    return urllib.parse.quote(name, safe=",")

