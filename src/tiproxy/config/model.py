"""The config's shape: frozen dataclasses with TiProxy's keys, defaults and value checks.

Every attribute is the TOML key with "-" written as "_" (`max-connections` is
`cfg.proxy.max_connections`). A field's metadata (built by `rules()`, config/fields.py) records
how the loader checks it and how the dumper writes it; the loader and the dumper
walk these dataclasses generically, so adding a key is one line here. Defaults are TiProxy's
(lib/config in pingcap/tiproxy) except where noted: `pd-addrs` is empty because we start without
PD, and `backend-addrs` is our own key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tiproxy.config.fields import (
    COUNT,
    DURATION,
    RATE,
    not_built,
    offline,
    one_of_rules,
    rules,
)
from tiproxy.config.tables import (
    BackendLabels,
    FrozenMap,
    NamespaceConfig,
    decode_addr_list,
    decode_backend_labels,
    decode_namespaces,
    encode_backend_labels,
    encode_namespaces,
)
from tiproxy.config.values import (
    all_of,
    check_backend_name,
    check_dial_addr,
    check_host,
    check_interface_name,
    check_listen_addr,
    check_listen_addr_list,
    check_virtual_ip,
    each,
    in_range,
    unique,
    zero_or_above,
    zero_or_range,
)

PROXY_PROTOCOLS = ("", "v2")
LOG_LEVELS = ("debug", "info", "warn", "warning", "error", "panic")  # any case, as zap reads
LOG_ENCODERS = ("tidb", "json", "console")
TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")
BALANCE_POLICIES = ("resource", "location", "connection")

# TiProxy's conn-buffer-size: 32 KiB by default, 0 also means the default, else 1 KiB..16 MiB.
DEFAULT_CONN_BUFFER_SIZE = 32 * 1024
_MIN_CONN_BUFFER_SIZE = 1024
_MAX_CONN_BUFFER_SIZE = 16 * 1024 * 1024


_ADDR_LIST = rules(check=all_of(each(check_dial_addr), unique))
_PD_ADDRS = rules(check=all_of(each(check_dial_addr), unique), decode=decode_addr_list)
_BACKEND_NAMES = rules(check=all_of(each(check_backend_name), unique))
_CONN_BUFFER_SIZE = rules(check=zero_or_range(_MIN_CONN_BUFFER_SIZE, _MAX_CONN_BUFFER_SIZE))
# What a session records of an open transaction for a replay: 1 KiB to 64 MiB.
_REPLAY_SIZE = rules(check=zero_or_range(1024, 64 << 20))
# RSA keys for auto-certs: 0 is TiProxy's default (4096); smaller than 2048 is not safe.
_RSA_KEY_SIZE = rules(check=zero_or_range(2048, 16384))


@dataclass(frozen=True)
class HealthConfig:
    """Ours: how backends are checked. A check connects, reads the greeting and, with
    `[security] auth-sync-user`, logs in and reads the status counters (Galera state, load)."""

    enable: bool = True
    interval: float = field(default=3.0, metadata=DURATION)
    timeout: float = field(default=2.0, metadata=DURATION)
    failure_threshold: int = field(default=3, metadata=COUNT)  # failures in a row: unhealthy
    success_threshold: int = field(default=2, metadata=COUNT)  # successes in a row: healthy


@dataclass(frozen=True)
class KeepAliveConfig:
    """TCP keep-alive of one side; idle, cnt and intvl apply only while the connection is idle."""

    enabled: bool = False
    idle: float = field(default=0.0, metadata=DURATION)
    cnt: int = field(default=0, metadata=COUNT)
    intvl: float = field(default=0.0, metadata=DURATION)
    timeout: float = field(default=0.0, metadata=DURATION)


@dataclass(frozen=True)
class ProxyConfig:
    """`[proxy]`: the SQL port and how sessions on it are kept and shut down."""

    addr: str = field(default="0.0.0.0:6000",
                      metadata=rules(check=check_listen_addr_list, online=False))
    # TiProxy's: the host registered in PD's etcd with pd-addrs (discovery/registration.py).
    advertise_addr: str = field(default="", metadata=rules(check=check_host, online=False))
    pd_addrs: tuple[str, ...] = field(default=(), metadata=_PD_ADDRS)
    backend_addrs: tuple[str, ...] = field(default=(), metadata=_ADDR_LIST)  # ours: static list
    max_connections: int = field(default=0, metadata=COUNT)  # 0: unlimited
    # TiProxy's: at or over this share of the memory it may use, new clients are refused and
    # health says so (0: off; (0, 0.5) counts as 0.5). See control/memory.py.
    high_memory_usage_reject_threshold: float = field(
        default=0.9, metadata=rules(check=in_range(0.0, 1.0)))
    # Ours: data-plane processes; 0: one per CPU this process may use (workers/sockets.py).
    workers: int = field(default=0, metadata=offline(COUNT))
    conn_buffer_size: int = field(default=DEFAULT_CONN_BUFFER_SIZE,
                                  metadata=offline(_CONN_BUFFER_SIZE))
    frontend_keepalive: KeepAliveConfig = field(default=KeepAliveConfig(enabled=True))
    backend_healthy_keepalive: KeepAliveConfig = field(
        default=KeepAliveConfig(enabled=True, idle=60.0, cnt=5, intvl=3.0, timeout=15.0)
    )
    backend_unhealthy_keepalive: KeepAliveConfig = field(
        default=KeepAliveConfig(enabled=True, idle=10.0, cnt=5, intvl=1.0, timeout=5.0)
    )
    # Online, as in TiProxy: a change applies to the connections that come after it.
    proxy_protocol: str = field(default="", metadata=one_of_rules(*PROXY_PROTOCOLS))
    graceful_wait_before_shutdown: int = field(default=0, metadata=COUNT)  # seconds
    graceful_close_conn_timeout: int = field(default=15, metadata=COUNT)  # seconds
    fail_backend_list: tuple[str, ...] = field(default=(), metadata=_BACKEND_NAMES)
    failover_timeout: int = field(default=60, metadata=COUNT)  # seconds
    # Ours: replay an open transaction on another backend when its own dies, or after a
    # deadlock or a lock wait timeout (net/replay.py), recording at most this many bytes of
    # statements per transaction. Read when a session logs in.
    transaction_replay: bool = False
    transaction_replay_max_size: int = field(default=1 << 20, metadata=_REPLAY_SIZE)
    # Ours: DNS names ("name:port") re-resolved every dns-interval, one backend per address.
    backend_dns: tuple[str, ...] = field(default=(), metadata=_ADDR_LIST)
    dns_interval: float = field(default=5.0, metadata=DURATION)
    # Ours: backend connections kept per backend for the next login of the same user, reset
    # between clients (net/pool.py); 0: off. The proxy must verify logins itself, so it needs
    # [security] auth-sync-user or users-file. Kept at most backend-pool-idle seconds.
    backend_pool_size: int = field(default=0, metadata=COUNT)
    backend_pool_idle: float = field(default=30.0, metadata=DURATION)
    backend_labels: tuple[BackendLabels, ...] = field(
        default=(), metadata=rules(decode=decode_backend_labels, encode=encode_backend_labels))

    @property
    def buffer_size(self) -> int:
        """conn-buffer-size, with TiProxy's 0 meaning its default."""
        return self.conn_buffer_size or DEFAULT_CONN_BUFFER_SIZE

    @property
    def listen_addrs(self) -> tuple[str, ...]:
        """`addr` may list several addresses separated by commas, as in TiProxy."""
        return tuple(part.strip() for part in self.addr.split(","))


@dataclass(frozen=True)
class APIConfig:
    """`[api]`: the HTTP API and metrics port."""

    addr: str = field(default="0.0.0.0:3080",
                      metadata=rules(check=check_listen_addr, online=False))
    proxy_protocol: str = field(default="", metadata=offline(one_of_rules(*PROXY_PROTOCOLS)))
    # Ours: a file holding the bearer token that lets a caller other than a loopback peer (or
    # one with a verified client certificate) use the write routes; empty: no token works.
    auth_token_file: str = ""


def _check_log_level(value: str) -> None:
    if value.lower() not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not one of {', '.join(map(repr, LOG_LEVELS))}")


@dataclass(frozen=True)
class LogFileConfig:
    filename: str = ""  # empty: log to stderr only
    max_size: int = field(default=300, metadata=COUNT)  # MB
    max_days: int = field(default=3, metadata=COUNT)
    max_backups: int = field(default=3, metadata=COUNT)


@dataclass(frozen=True)
class LogConfig:
    """`[log]`: the encoder and the file are set up once at start; the level follows reloads."""

    # Online, as in TiProxy: a reload sets the new level (logs.py apply_level).
    level: str = field(default="info", metadata=rules(check=_check_log_level))
    encoder: str = field(default="tidb", metadata=offline(one_of_rules(*LOG_ENCODERS)))
    log_file: LogFileConfig = field(default=LogFileConfig(), metadata=offline())


@dataclass(frozen=True)
class TLSConfig:
    """One TLS object of `[security]`, with TiProxy's fields. A server object (`server-tls`)
    is on with `cert` or `auto-certs`; a client object (`sql-tls`) with `ca` or `skip-ca`.
    See tiproxy/tls/contexts.py for what each field does on each side."""

    ca: str = ""
    cert: str = ""
    key: str = ""  # a path to the key, not the key: no need to redact
    min_tls_version: str = field(default="1.2", metadata=one_of_rules(*TLS_VERSIONS))
    cert_allowed_cn: tuple[str, ...] = ()  # server objects: the client certificate's CN
    auto_certs: bool = False
    rsa_key_size: int = field(default=0, metadata=_RSA_KEY_SIZE)  # 0: TiProxy's 4096
    autocert_expire_duration: float = field(default=0.0, metadata=DURATION)  # 0: 90 days
    skip_ca: bool = False

    def cross_check(self) -> tuple[str, str] | None:
        """(key, reason) when the fields disagree with each other."""
        if self.cert and not self.key:
            return "key", "cert is set, so key must be set too"
        if self.key and not self.cert:
            return "cert", "key is set, so cert must be set too"
        if not self.auto_certs:
            if self.rsa_key_size:
                return "rsa-key-size", "only used with auto-certs = true"
            if self.autocert_expire_duration:
                return "autocert-expire-duration", "only used with auto-certs = true"
        return None

    def client_object_problem(self) -> tuple[str, str] | None:
        """(key, reason) for fields that mean nothing on a client object (`sql-tls`)."""
        if self.auto_certs:
            return "auto-certs", "not supported on a client TLS object"
        if self.cert_allowed_cn:
            return "cert-allowed-cn", "not supported on a client TLS object"
        if self.cert and not (self.ca or self.skip_ca):
            return "cert", "a client certificate needs ca or skip-ca (else TLS is off)"
        return None

    def server_object_problem(self) -> tuple[str, str] | None:
        """(key, reason) for a server object set up so that it could not serve TLS."""
        if not (self.cert or self.auto_certs):
            for key, value in (("ca", self.ca), ("skip-ca", self.skip_ca),
                               ("cert-allowed-cn", self.cert_allowed_cn)):
                if value:
                    return key, "needs cert and key, or auto-certs = true (else TLS is off)"
        return None

    @property
    def configured(self) -> bool:
        return self != TLSConfig()


@dataclass(frozen=True)
class SecurityConfig:
    server_tls: TLSConfig = field(default=TLSConfig())  # clients -> the SQL port
    server_http_tls: TLSConfig = field(default=TLSConfig())  # clients -> the API port
    cluster_tls: TLSConfig = field(default=TLSConfig())  # the proxy -> PD / TiDB status ports
    sql_tls: TLSConfig = field(default=TLSConfig())  # the proxy -> backends' SQL ports
    require_backend_tls: bool = False
    # Ours: the proxy's own account on the backends (mysql_native_password). It carries out
    # what no client connection can, such as a KILL aimed at a session on another backend.
    auth_sync_user: str = ""
    auth_sync_password: str = field(default="", metadata=rules(secret=True))
    # Ours: where the stored mysql_native_password hashes come from, so that sessions can log
    # in to another backend when they move: a file of `user *HEX` lines, and/or the backends'
    # mysql.user read by auth-sync-user every auth-sync-interval (and after a failed match).
    users_file: str = ""
    auth_sync_interval: float = field(default=60.0, metadata=DURATION)
    # TiProxy's: the AES-256 key of encrypted traffic captures (its first 32 bytes). A path:
    # the file's content is the secret, and is read only when a capture or replay needs it.
    encryption_key_path: str = ""

    def cross_check(self) -> tuple[str, str] | None:
        """(key, reason) for a TLS object used in a way the proxy does not build."""
        for key, obj in (("server-tls", self.server_tls),
                         ("server-http-tls", self.server_http_tls)):
            problem = obj.server_object_problem()
            if problem is not None:
                return f"{key}.{problem[0]}", problem[1]
        for key, obj in (("sql-tls", self.sql_tls), ("cluster-tls", self.cluster_tls)):
            problem = obj.client_object_problem()
            if problem is not None:
                return f"{key}.{problem[0]}", problem[1]
        return None


@dataclass(frozen=True)
class FactorConfig:
    enabled: bool = True
    migrations_per_second: float = field(default=0.0, metadata=RATE)  # 0: the router's default


@dataclass(frozen=True)
class StatusFactorConfig:
    migrations_per_second: float = field(default=0.0, metadata=RATE)


@dataclass(frozen=True)
class CPUFactorConfig:
    enabled: bool = True
    migrations_per_second: float = field(default=0.0, metadata=RATE)
    min_balance_usage: float = field(default=0.0, metadata=rules(check=in_range(0.0, 1.0)))


@dataclass(frozen=True)
class ConnCountFactorConfig:
    migrations_per_second: float = field(default=0.0, metadata=RATE)
    count_ratio_threshold: float = field(default=0.0, metadata=rules(check=zero_or_above(1.0)))


@dataclass(frozen=True)
class BalanceConfig:
    """`[balance]`: the policy and its factors, in TiProxy's order of priority."""

    label_name: str = ""
    policy: str = field(default="resource", metadata=one_of_rules(*BALANCE_POLICIES))
    status: StatusFactorConfig = field(default=StatusFactorConfig())
    health: FactorConfig = field(default=FactorConfig())
    memory: FactorConfig = field(default=FactorConfig())
    cpu: CPUFactorConfig = field(default=CPUFactorConfig())
    location: FactorConfig = field(default=FactorConfig())
    conn_count: ConnCountFactorConfig = field(default=ConnCountFactorConfig())

    def cross_check(self) -> tuple[str, str] | None:
        why = "this factor is not built; the router uses location, load and connection count"
        problem = not_built(self, {"status": why, "health": why, "memory": why})
        if problem is None and not self.cpu.enabled:
            problem = "cpu.enabled", "not supported yet: the load factor cannot be turned off"
        if problem is None and self.cpu.min_balance_usage:
            problem = "cpu.min-balance-usage", "not supported yet"
        if problem is None and not self.location.enabled:
            problem = "location.enabled", "not supported yet: use label-name = \"\" instead"
        return problem



@dataclass(frozen=True)
class HAConfig:
    """`[ha]`: TiProxy's virtual IP (ha/vip.py). The proxies that set the same `virtual-ip`
    elect one owner in PD's etcd; it adds the address to `interface` and announces it with
    `garp-burst-count` gratuitous ARP packets at once (0 counts as 1, as in TiProxy), then
    the same burst once a second `garp-refresh-count` times. Read at start only, as TiProxy."""

    virtual_ip: str = field(default="", metadata=offline(rules(check=check_virtual_ip)))
    interface: str = field(default="", metadata=offline(rules(check=check_interface_name)))
    garp_burst_count: int = field(default=5, metadata=offline(COUNT))
    garp_refresh_count: int = field(default=30, metadata=offline(COUNT))

    def cross_check(self) -> tuple[str, str] | None:
        if self.virtual_ip and not self.interface:
            return "interface", "needed with virtual-ip: the interface that carries the address"
        if self.interface and not self.virtual_ip:
            return "virtual-ip", "needed with interface (or remove interface)"
        return None


@dataclass(frozen=True)
class Config:
    """The whole config file. `Config()` is the config of an empty file."""

    proxy: ProxyConfig = field(default=ProxyConfig())
    api: APIConfig = field(default=APIConfig())
    log: LogConfig = field(default=LogConfig())
    security: SecurityConfig = field(default=SecurityConfig())
    balance: BalanceConfig = field(default=BalanceConfig())
    labels: Mapping[str, str] = field(default=FrozenMap())  # e.g. zone = "z1"
    health: HealthConfig = field(default=HealthConfig())
    namespaces: tuple[NamespaceConfig, ...] = field(
        default=(), metadata=rules(decode=decode_namespaces, encode=encode_namespaces))
    # TiProxy's: false refuses the /api/traffic routes (capture, replay, cancel, show).
    enable_traffic_replay: bool = True
    ha: HAConfig = field(default=HAConfig())

    def cross_check(self) -> tuple[str, str] | None:
        """A backend belongs to one namespace: the default one ([proxy] backend-addrs) or one
        of [namespaces]. A virtual IP's owner is elected in PD's etcd."""
        if self.proxy.backend_pool_size and not self.security.auth_sync_user:
            return ("proxy.backend-pool-size", "needs [security] auth-sync-user: a kept "
                    "connection is handed only to a login the proxy verified itself, and only "
                    "where the backends' settings let a reset stand for a new login")
        if self.proxy.backend_pool_size and self.proxy.proxy_protocol:
            return ("proxy.backend-pool-size", "not supported with [proxy] proxy-protocol: a "
                    "kept connection's PROXY header names its first client")
        if self.ha.virtual_ip and not self.proxy.pd_addrs:
            return ("ha.virtual-ip", "needs [proxy] pd-addrs: the proxies elect the "
                    "address's owner in PD's etcd")
        default = set(self.proxy.backend_addrs)
        for ns in self.namespaces:
            for i, addr in enumerate(ns.backend_addrs):
                if addr in default:
                    return (f"namespaces.{ns.name}.backend-addrs[{i}]",
                            f"{addr} is in [proxy] backend-addrs (the default namespace) too")
        return None


# Config classes the running proxy reads only at start, for classes whose fields carry no
# ONLINE metadata of their own: a change anywhere inside one is refused as a change of the whole
# object. None today: TLS objects are rebuilt on reload (tls/store.py).
OFFLINE_SECTIONS: frozenset[type] = frozenset()
