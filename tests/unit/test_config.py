"""The config as a user meets it: TiProxy's keys and defaults, clear refusals, round trips."""

from __future__ import annotations

import dataclasses
import pickle
import tomllib
from pathlib import Path

import pytest

from tiproxy.config import (
    REDACTED,
    Config,
    ConfigError,
    config_checksum,
    config_to_dict,
    config_to_toml,
    load_config,
    merge_config,
    parse_config,
)
from tiproxy.config.dump import section_to_dict
from tiproxy.config.fields import rules
from tiproxy.config.values import format_duration, parse_duration, split_host_port

# The example from TiProxy's documentation (tiproxy-configuration.md).
TIPROXY_DOC_EXAMPLE = """
[proxy]
addr = "0.0.0.0:6000"
max-connections = 100

[api]
addr = "0.0.0.0:3080"

[log]
level = "info"

[security]
[security.cluster-tls]
skip-ca = true

[security.sql-tls]
skip-ca = true
"""

RICH = """
labels = { zone = "z1", dc = "dc1" }

[proxy]
addr = "127.0.0.1:6001,127.0.0.1:6002"
pd-addrs = ["10.0.0.1:2379", "10.0.0.2:2379"]
backend-addrs = ["127.0.0.1:3306", "[::1]:3307", "db.example:3308"]
max-connections = 500
graceful-wait-before-shutdown = 5
graceful-close-conn-timeout = 30
fail-backend-list = ["db-tidb-0", "10.0.0.10:4000"]
failover-timeout = 0

[proxy.backend-unhealthy-keepalive]
idle = "1m30s"
intvl = "250ms"

[api]
addr = ":3081"

[log]
level = "debug"
encoder = "json"

[log.log-file]
filename = "/var/log/tiproxy.log"
max-size = 10

[security]
require-backend-tls = true

[security.server-tls]
cert = "/etc/tiproxy/server.crt"
key = "/etc/tiproxy/server.key"
min-tls-version = "1.3"

[balance]
policy = "connection"
label-name = "zone"

[balance.conn-count]
migrations-per-second = 2.5
count-ratio-threshold = 1.2
"""


def test_an_empty_file_gives_tiproxys_defaults() -> None:
    cfg = parse_config("")
    assert cfg == Config() == load_config(None)
    assert cfg.proxy.addr == "0.0.0.0:6000"
    assert cfg.api.addr == "0.0.0.0:3080"
    assert cfg.proxy.max_connections == 0
    assert cfg.proxy.conn_buffer_size == 32 * 1024
    assert cfg.proxy.graceful_wait_before_shutdown == 0
    assert cfg.proxy.graceful_close_conn_timeout == 15
    assert cfg.proxy.failover_timeout == 60
    assert cfg.proxy.proxy_protocol == ""
    assert cfg.proxy.pd_addrs == ()
    assert cfg.proxy.backend_addrs == ()
    assert cfg.log.level == "info"
    assert cfg.log.encoder == "tidb"
    assert (cfg.log.log_file.max_size, cfg.log.log_file.max_days) == (300, 3)
    assert cfg.security.sql_tls.min_tls_version == "1.2"
    assert cfg.security.require_backend_tls is False
    assert cfg.balance.policy == "resource"
    keepalive = cfg.proxy.backend_healthy_keepalive
    assert (keepalive.enabled, keepalive.idle, keepalive.cnt, keepalive.timeout) == (
        True,
        60.0,
        5,
        15.0,
    )


def test_tiproxys_documented_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "tiproxy.toml"
    path.write_text(TIPROXY_DOC_EXAMPLE)
    cfg = load_config(path)
    assert cfg.proxy.max_connections == 100
    assert cfg.security.cluster_tls.skip_ca is True
    assert cfg.security.sql_tls.skip_ca is True
    assert cfg.security.server_tls.skip_ca is False


def test_tiproxys_own_value_forms_are_accepted() -> None:
    # TiProxy writes pd-addrs as one comma-separated string and durations as nanoseconds.
    cfg = parse_config(
        '[proxy]\npd-addrs = "127.0.0.1:2379, 127.0.0.2:2379"\n'
        "[proxy.backend-healthy-keepalive]\nidle = 60000000000\n"
    )
    assert cfg.proxy.pd_addrs == ("127.0.0.1:2379", "127.0.0.2:2379")
    assert cfg.proxy.backend_healthy_keepalive.idle == 60.0


def test_a_partial_nested_table_keeps_the_other_defaults_of_that_table() -> None:
    cfg = parse_config('[proxy.backend-healthy-keepalive]\nidle = "5s"\n')
    keepalive = cfg.proxy.backend_healthy_keepalive
    assert keepalive.idle == 5.0
    assert (keepalive.enabled, keepalive.cnt, keepalive.intvl) == (True, 5, 3.0)


def test_rich_config_reads_into_typed_attributes() -> None:
    cfg = parse_config(RICH)
    assert cfg.proxy.listen_addrs == ("127.0.0.1:6001", "127.0.0.1:6002")
    assert cfg.proxy.backend_addrs == ("127.0.0.1:3306", "[::1]:3307", "db.example:3308")
    assert cfg.proxy.fail_backend_list == ("db-tidb-0", "10.0.0.10:4000")
    assert cfg.proxy.backend_unhealthy_keepalive.idle == 90.0
    assert cfg.proxy.backend_unhealthy_keepalive.intvl == 0.25
    assert cfg.api.addr == ":3081"
    assert cfg.labels == {"zone": "z1", "dc": "dc1"}
    assert cfg.balance.conn_count.migrations_per_second == 2.5


@pytest.mark.parametrize("text", ["", TIPROXY_DOC_EXAMPLE, RICH])
def test_toml_round_trip(text: str) -> None:
    cfg = parse_config(text)
    assert parse_config(config_to_toml(cfg)) == cfg


def test_dict_uses_toml_key_names() -> None:
    d = config_to_dict(parse_config(RICH))
    assert d["proxy"]["max-connections"] == 500
    assert d["proxy"]["backend-addrs"] == ["127.0.0.1:3306", "[::1]:3307", "db.example:3308"]
    assert d["proxy"]["backend-unhealthy-keepalive"]["idle"] == "1m30s"
    assert d["security"]["server-tls"]["min-tls-version"] == "1.3"
    assert d["labels"] == {"zone": "z1", "dc": "dc1"}
    assert tomllib.loads(config_to_toml(parse_config(RICH)))["proxy"]["failover-timeout"] == 0


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('[proxy]\nmax-connections = "100"', "proxy.max-connections", "expected an integer"),
        ("[proxy]\nmax-connections = -1", "proxy.max-connections", "must not be negative"),
        ("[proxy]\nmax-connections = 1.5", "proxy.max-connections", "expected an integer"),
        ("[proxy]\nmax-connection = 1", "proxy.max-connection", "did you mean 'max-connections'"),
        ("[proxyy]\naddr = ':1'", "proxyy", "unknown section"),
        ("[proxy.frontend-keepalive]\nidel = '1s'", "proxy.frontend-keepalive.idel", "unknown"),
        ("[metrics]\nenabled = true", "metrics", "unknown section"),
        ('[proxy]\naddr = "0.0.0.0"', "proxy.addr", "no port"),
        ('[proxy]\naddr = "0.0.0.0:65536"', "proxy.addr", "out of range"),
        ('[proxy]\naddr = "0.0.0.0:http"', "proxy.addr", "not a number"),
        ('[proxy]\nbackend-addrs = ["127.0.0.1:0"]', "proxy.backend-addrs[0]", "out of range"),
        ('[proxy]\nbackend-addrs = [":3306"]', "proxy.backend-addrs[0]", "no host"),
        ('[proxy]\nbackend-addrs = ["::1:3306"]', "proxy.backend-addrs[0]", "brackets"),
        ('[proxy]\nbackend-addrs = "a:1"', "proxy.backend-addrs", "expected a list"),
        ("[proxy]\nbackend-addrs = [1]", "proxy.backend-addrs[0]", "expected a string"),
        ('[proxy]\nbackend-addrs = ["a:1", "a:1"]', "proxy.backend-addrs", "listed twice"),
        ("[proxy]\npd-addrs = 5", "proxy.pd-addrs", "expected a list"),
        ('[proxy]\nadvertise-addr = "h:6000"', "proxy.advertise-addr", "without a port"),
        ('[proxy]\nfail-backend-list = [" "]', "proxy.fail-backend-list[0]", "empty"),
        ('[proxy]\nproxy-protocol = "v1"', "proxy.proxy-protocol", "not one of"),
        ("[proxy]\nconn-buffer-size = 100", "proxy.conn-buffer-size", "between 1024"),
        ("[proxy]\nfailover-timeout = -1", "proxy.failover-timeout", "must not be negative"),
        ('[proxy.frontend-keepalive]\nidle = "5 s"', "proxy.frontend-keepalive.idle", "duration"),
        ('[proxy.frontend-keepalive]\nidle = "-5s"', "proxy.frontend-keepalive.idle", "duration"),
        ("[proxy.frontend-keepalive]\nidle = -5", "proxy.frontend-keepalive.idle", "negative"),
        ('[proxy.frontend-keepalive]\nenabled = "yes"', "proxy.frontend-keepalive.enabled", "bool"),
        ("[proxy]\nfrontend-keepalive = 1", "proxy.frontend-keepalive", "expected a table"),
        ('[log]\nlevel = "verbose"', "log.level", "not one of"),
        ('[log]\nencoder = "text"', "log.encoder", "not one of"),
        ('[security.sql-tls]\nmin-tls-version = "1.4"', "security.sql-tls.min-tls-version", "not"),
        ('[security.server-tls]\ncert = "a.crt"', "security.server-tls.key", "key must be set"),
        ('[balance]\npolicy = "round-robin"', "balance.policy", "not one of"),
        ("[balance.cpu]\nmin-balance-usage = 2.0", "balance.cpu.min-balance-usage", "between"),
        ("labels = { zone = 1 }", "labels.zone", "expected a string"),
        ("proxy = 1", "proxy", "expected a table"),
    ],
)
def test_invalid_values_are_refused_with_the_dotted_key_and_reason(
    text: str, key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert reason in str(info.value)


def test_bad_toml_syntax_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        parse_config("[proxy\naddr =")


def test_missing_file_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_config(missing)


def test_merge_changes_only_the_given_keys() -> None:
    base = parse_config(RICH)
    merged = merge_config(base, "proxy.max-connections = 7\n[log]\nlevel = 'warn'\n")
    assert merged.proxy.max_connections == 7
    assert merged.log.level == "warn"
    assert merged.log.encoder == "json"  # untouched keys keep the running value
    assert merged.proxy.backend_addrs == base.proxy.backend_addrs
    assert dataclasses.replace(merged, proxy=base.proxy, log=base.log) == base


def test_merge_validates_like_a_whole_file() -> None:
    with pytest.raises(ConfigError) as info:
        merge_config(Config(), "[proxy]\nmax-connections = -3")
    assert info.value.key == "proxy.max-connections"
    with pytest.raises(ConfigError, match=r"proxy\.nope: unknown key"):
        merge_config(Config(), "proxy.nope = 1")


def test_merge_can_complete_a_cross_checked_pair() -> None:
    # A cert alone is refused, but the merged result is what is checked, so a later merge can
    # add the key to a config that already has the cert, and vice versa.
    with_both = parse_config('[security.server-tls]\ncert = "c.pem"\nkey = "k.pem"')
    merged = merge_config(with_both, '[security.server-tls]\ncert = "other.pem"')
    assert merged.security.server_tls.cert == "other.pem"
    assert merged.security.server_tls.key == "k.pem"


@pytest.mark.parametrize(("text", "reason"), [
    ("[proxy]\nbackend-pool-size = 4", "needs [security] auth-sync-user"),
    ('[proxy]\nbackend-pool-size = 4\n[security]\nusers-file = "u"',
     "needs [security] auth-sync-user"),
    ('[proxy]\nbackend-pool-size = 4\nproxy-protocol = "v2"\n[security]\n'
     'auth-sync-user = "sync"', "not supported with [proxy] proxy-protocol"),
])
def test_a_backend_pool_the_proxy_cannot_keep_safely_is_refused(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.key == "proxy.backend-pool-size"
    assert reason in info.value.reason
    cfg = parse_config('[proxy]\nbackend-pool-size = 4\nbackend-pool-idle = "5s"\n'
                       '[security]\nauth-sync-user = "sync"')
    assert (cfg.proxy.backend_pool_size, cfg.proxy.backend_pool_idle) == (4, 5.0)


def test_advertise_addr_is_taken() -> None:
    cfg = parse_config('[proxy]\nadvertise-addr = "proxy-0.example"')
    assert cfg.proxy.advertise_addr == "proxy-0.example"


def test_proxy_protocol_v2_is_taken() -> None:
    assert parse_config('[proxy]\nproxy-protocol = "v2"').proxy.proxy_protocol == "v2"
    assert parse_config('[api]\nproxy-protocol = "v2"').api.proxy_protocol == "v2"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[balance.memory]\nenabled = false", "balance.memory"),
        ("[balance.cpu]\nmin-balance-usage = 0.5", "balance.cpu.min-balance-usage"),
        ("[balance.location]\nenabled = false", "balance.location.enabled"),
    ],
)
def test_keys_not_built_are_refused_not_ignored(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.key == key
    assert "not supported" in info.value.reason
    parse_config(config_to_toml(Config()))  # every default, written out, still loads


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[security.sql-tls]\nauto-certs = true", "security.sql-tls.auto-certs", "client TLS"),
        ('[security.sql-tls]\ncert-allowed-cn = ["a"]', "security.sql-tls.cert-allowed-cn",
         "client TLS"),
        ('[security.sql-tls]\ncert = "c"\nkey = "k"', "security.sql-tls.cert", "needs ca"),
        ('[security.server-tls]\nca = "ca.pem"', "security.server-tls.ca", "needs cert"),
        ('[security.server-http-tls]\nskip-ca = true', "security.server-http-tls.skip-ca",
         "needs cert"),
        ("[security.cluster-tls]\nauto-certs = true", "security.cluster-tls.auto-certs",
         "client TLS"),
        ("[security.server-tls]\nrsa-key-size = 4096", "security.server-tls.rsa-key-size",
         "auto-certs"),
        ("[security.server-tls]\nauto-certs = true\nrsa-key-size = 1024",
         "security.server-tls.rsa-key-size", "between 2048"),
    ],
)
def test_tls_objects_that_could_not_work_are_refused(text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.key == key
    assert reason in info.value.reason


def test_checksum_follows_the_config() -> None:
    assert config_checksum(Config()) == config_checksum(parse_config(""))
    changed = merge_config(Config(), "proxy.max-connections = 1")
    assert config_checksum(Config()) != config_checksum(changed)


@dataclasses.dataclass(frozen=True)
class _WithSecret:
    user: str = "monitor"
    password: str = dataclasses.field(default="", metadata=rules(secret=True))


def test_secret_fields_are_redacted_only_when_asked() -> None:
    section = _WithSecret(password="hunter2")
    assert section_to_dict(section, redact=True) == {"user": "monitor", "password": REDACTED}
    assert section_to_dict(section, redact=False)["password"] == "hunter2"
    assert section_to_dict(_WithSecret(), redact=True)["password"] == ""  # unset stays visible


def test_nothing_in_the_default_config_is_secret() -> None:
    assert config_to_dict(Config(), redact=True) == config_to_dict(Config())


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("1.5s", 1.5), ("500ms", 0.5), ("1m30s", 90.0), ("2h", 7200.0), ("10us", 1e-5)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)


@pytest.mark.parametrize(
    ("addr", "listen", "expected"),
    [
        ("127.0.0.1:3306", False, ("127.0.0.1", 3306)),
        ("[::1]:3306", False, ("::1", 3306)),
        (":6000", True, ("", 6000)),
        ("127.0.0.1:0", True, ("127.0.0.1", 0)),
    ],
)
def test_split_host_port(addr: str, listen: bool, expected: tuple[str, int]) -> None:
    assert split_host_port(addr, listen=listen) == expected


def test_configs_can_be_pickled_for_worker_processes() -> None:
    cfg = parse_config(RICH)
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert hash(cfg) == hash(parse_config(RICH))


def test_checksum_is_not_taken_over_secrets() -> None:
    one = parse_config('[security]\nauth-sync-user = "a"\nauth-sync-password = "pw-one"\n')
    two = parse_config('[security]\nauth-sync-user = "a"\nauth-sync-password = "pw-two"\n')
    assert config_checksum(one) == config_checksum(two)
