"""TiProxy's namespace documents over our config: what maps, what is refused and why."""

from __future__ import annotations

import pytest

from tiproxy.config import ConfigError, merge_config, parse_config
from tiproxy.config.namespaces import (
    Namespace,
    NamespaceError,
    config_change,
    parse_document,
    running_namespaces,
)

CONFIG = parse_config(
    '[proxy]\nbackend-addrs = ["10.0.0.1:3306", "10.0.0.2:3306"]\n'
    '[namespaces.analytics]\nusers = ["report"]\nbackend-addrs = ["10.0.1.1:3306"]\n'
    '[namespaces.batch]\nusers = ["etl", "loader"]\nbackend-addrs = ["10.0.2.1:3306"]\n')


def test_the_config_as_tiproxy_documents() -> None:
    docs = [ns.document() for ns in running_namespaces(CONFIG).values()]
    assert docs == [
        {"namespace": "default", "frontend": {"user": "", "security": {}},
         "backend": {"instances": ["10.0.0.1:3306", "10.0.0.2:3306"], "security": {}}},
        {"namespace": "analytics", "frontend": {"user": "report", "security": {}},
         "backend": {"instances": ["10.0.1.1:3306"], "security": {}}},
        {"namespace": "batch", "frontend": {"user": "", "users": ["etl", "loader"],
                                            "security": {}},
         "backend": {"instances": ["10.0.2.1:3306"], "security": {}}},
    ]
    for doc in docs:  # every document read back is the same namespace
        assert parse_document(doc) == running_namespaces(CONFIG)[doc["namespace"]]


def test_the_documents_written_back_are_the_same_config() -> None:
    assert merge_config(CONFIG, config_change(running_namespaces(CONFIG).values())) == CONFIG


def test_tiproxys_own_shapes_are_taken() -> None:
    # What TiProxy's tiproxyctl sends for conf/namespace/test.toml without its selector-type,
    # and what Go marshals for an empty instance list.
    assert parse_document({"namespace": "ns2", "frontend": {"user": "xhe", "security": {}},
                           "backend": {"instances": ["127.0.0.1:7000"], "security": {}}}) == \
        Namespace("ns2", ("xhe",), ("127.0.0.1:7000",))
    assert parse_document({"namespace": "default", "frontend": {"user": "", "security": {}},
                           "backend": {"instances": None, "security": {}}}) == \
        Namespace("default")
    assert parse_document({"frontend": {"user": "u", "users": ["v", "u"]},
                           "backend": {"instances": ["h:1"]}}, path_name="p") == \
        Namespace("p", ("u", "v"), ("h:1",))
    # Go's zero values in a TLS object mean unset.
    assert parse_document({"namespace": "n", "frontend": {"security": {"ca": "", "skip-ca": False}},
                           "backend": {"instances": ["h:1"]}}).name == "n"


@pytest.mark.parametrize(
    ("doc", "key", "reason"),
    [
        ({"namespace": "n", "frontend": {"security": {"ca": "/ca.pem"}},
          "backend": {"instances": ["h:1"]}}, "frontend.security.ca", "not supported"),
        ({"namespace": "n", "backend": {"instances": ["h:1"], "security": {"skip-ca": True}}},
         "backend.security.skip-ca", "not supported"),
        ({"namespace": "n", "backend": {"instances": ["h:1"], "selector-type": "random"}},
         "backend.selector-type", "not supported"),
        ({"namespace": "n", "backend": {"instances": ["h:1"], "weights": [1]}},
         "backend.weights", "unknown key"),
        ({"namespace": "n", "owner": "x", "backend": {"instances": ["h:1"]}}, "owner",
         "unknown key"),
        ({"namespace": "n", "frontend": {"security": {"password": "x"}},
          "backend": {"instances": ["h:1"]}}, "frontend.security.password", "unknown key"),
        ({"namespace": "default", "frontend": {"user": "u"}}, "frontend.user",
         "not supported on the default namespace"),
        ({"namespace": "n", "frontend": {"user": "u"}}, "backend.instances", "needs backends"),
        ({"namespace": "n", "backend": {"instances": ["no-port"]}}, "backend.instances[0]",
         "no port"),
        ({"namespace": "n", "backend": {"instances": ["h:1", "h:1"]}}, "backend.instances",
         "twice"),
        ({"namespace": "n", "backend": {"instances": "h:1"}}, "backend.instances", "list"),
        ({"namespace": "a/b", "backend": {"instances": ["h:1"]}}, "namespace", "'/'"),
        ({"namespace": 7}, "namespace", "string"),
        ({"backend": {"instances": ["h:1"]}}, "namespace", "needs a name"),
        ([], "", "table"),
    ],
)
def test_what_cannot_be_honoured_is_refused_by_key(doc: object, key: str, reason: str) -> None:
    with pytest.raises(NamespaceError) as info:
        parse_document(doc)
    assert info.value.key == key
    assert reason in info.value.reason


def test_the_path_and_the_document_must_agree_on_the_name() -> None:
    with pytest.raises(NamespaceError, match="names 'a', the path 'b'"):
        parse_document({"namespace": "a", "backend": {"instances": ["h:1"]}}, path_name="b")


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        ('[namespaces.default]\nbackend-addrs = ["h:1"]\n', "namespaces.default",
         "TiProxy's default namespace"),
        ('[namespaces.a]\nbackend-addrs = ["h:1"]\n[namespaces.b]\nbackend-addrs = ["h:1"]\n',
         "namespaces.b.backend-addrs[0]", "in namespace 'a' already"),
        ('[namespaces.a]\nbackend-addrs = ["h:1", "h:1"]\n', "namespaces.a.backend-addrs[1]",
         "already"),
        ('[proxy]\nbackend-addrs = ["h:1"]\n[namespaces.a]\nbackend-addrs = ["h:1"]\n',
         "namespaces.a.backend-addrs[0]", "[proxy] backend-addrs"),
        ('[namespaces."a b"]\nbackend-addrs = ["h:1"]\n', "namespaces.a b", "white space"),
    ],
)
def test_a_backend_belongs_to_one_namespace(toml: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(toml)
    assert info.value.key == key
    assert reason in info.value.reason
