"""Numbers the MySQL client/server protocol is made of: capabilities, commands, status flags.

Reference: https://dev.mysql.com/doc/dev/mysql-server/latest/PAGE_PROTOCOL.html and
https://mariadb.com/kb/en/clientserver-protocol/
"""

from __future__ import annotations

import enum

MAX_PAYLOAD = 0xFFFFFF  # a payload of this length is continued in the next packet
HEADER_SIZE = 4


# The flag sets below are plain int constants, not enum.IntFlag: every capability test on the
# login path and status test on the command path would otherwise build an IntFlag object.


class Capability:
    """Client/server capability flags (the low 32 bits; MariaDB's extension lives elsewhere)."""

    LONG_PASSWORD = 1 << 0
    FOUND_ROWS = 1 << 1
    LONG_FLAG = 1 << 2
    CONNECT_WITH_DB = 1 << 3
    NO_SCHEMA = 1 << 4
    COMPRESS = 1 << 5
    ODBC = 1 << 6
    LOCAL_FILES = 1 << 7
    IGNORE_SPACE = 1 << 8
    PROTOCOL_41 = 1 << 9
    INTERACTIVE = 1 << 10
    SSL = 1 << 11
    IGNORE_SIGPIPE = 1 << 12
    TRANSACTIONS = 1 << 13
    RESERVED = 1 << 14
    SECURE_CONNECTION = 1 << 15
    MULTI_STATEMENTS = 1 << 16
    MULTI_RESULTS = 1 << 17
    PS_MULTI_RESULTS = 1 << 18
    PLUGIN_AUTH = 1 << 19
    CONNECT_ATTRS = 1 << 20
    PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
    CAN_HANDLE_EXPIRED_PASSWORDS = 1 << 22
    SESSION_TRACK = 1 << 23
    DEPRECATE_EOF = 1 << 24
    OPTIONAL_RESULTSET_METADATA = 1 << 25
    ZSTD_COMPRESSION = 1 << 26
    QUERY_ATTRIBUTES = 1 << 27
    MULTI_FACTOR_AUTH = 1 << 28
    CAPABILITY_EXTENSION = 1 << 29
    SSL_VERIFY_SERVER_CERT = 1 << 30
    REMEMBER_OPTIONS = 1 << 31


# What the proxy lets through on the client leg. Everything else is masked out of the greeting it
# sends, so no client can switch on a framing the response tracker does not know:
# OPTIONAL_RESULTSET_METADATA and QUERY_ATTRIBUTES change result set and COM_QUERY layouts,
# ZSTD_COMPRESSION is a codec we do not implement, MULTI_FACTOR_AUTH adds auth rounds.
# MariaDB's extended capabilities (bulk operations, extended/cached metadata) are cleared too.
PROXY_CAPABILITIES = (
    Capability.LONG_PASSWORD
    | Capability.FOUND_ROWS
    | Capability.LONG_FLAG
    | Capability.CONNECT_WITH_DB
    | Capability.NO_SCHEMA
    | Capability.COMPRESS
    | Capability.ODBC
    | Capability.LOCAL_FILES
    | Capability.IGNORE_SPACE
    | Capability.PROTOCOL_41
    | Capability.INTERACTIVE
    | Capability.SSL
    | Capability.IGNORE_SIGPIPE
    | Capability.TRANSACTIONS
    | Capability.RESERVED
    | Capability.SECURE_CONNECTION
    | Capability.MULTI_STATEMENTS
    | Capability.MULTI_RESULTS
    | Capability.PS_MULTI_RESULTS
    | Capability.PLUGIN_AUTH
    | Capability.CONNECT_ATTRS
    | Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA
    | Capability.CAN_HANDLE_EXPIRED_PASSWORDS
    | Capability.SESSION_TRACK
    | Capability.DEPRECATE_EOF
)

# Capabilities that concern only one leg's transport; the proxy negotiates them per leg.
PER_LEG_CAPABILITIES = Capability.COMPRESS | Capability.SSL | Capability.SSL_VERIFY_SERVER_CERT


class Command(enum.IntEnum):
    """The first byte of a command packet."""

    SLEEP = 0x00
    QUIT = 0x01
    INIT_DB = 0x02
    QUERY = 0x03
    FIELD_LIST = 0x04
    CREATE_DB = 0x05
    DROP_DB = 0x06
    REFRESH = 0x07
    SHUTDOWN = 0x08
    STATISTICS = 0x09
    PROCESS_INFO = 0x0A
    CONNECT = 0x0B
    PROCESS_KILL = 0x0C
    DEBUG = 0x0D
    PING = 0x0E
    TIME = 0x0F
    DELAYED_INSERT = 0x10
    CHANGE_USER = 0x11
    BINLOG_DUMP = 0x12
    TABLE_DUMP = 0x13
    CONNECT_OUT = 0x14
    REGISTER_SLAVE = 0x15
    STMT_PREPARE = 0x16
    STMT_EXECUTE = 0x17
    STMT_SEND_LONG_DATA = 0x18
    STMT_CLOSE = 0x19
    STMT_RESET = 0x1A
    SET_OPTION = 0x1B
    STMT_FETCH = 0x1C
    DAEMON = 0x1D
    BINLOG_DUMP_GTID = 0x1E
    RESET_CONNECTION = 0x1F
    STMT_BULK_EXECUTE = 0xFA  # MariaDB's, with MARIADB_CLIENT_STMT_BULK_OPERATIONS


class MariaDBCapability:
    """MariaDB's extended capabilities: the 4 bytes at the end of the greeting's and the
    handshake response's filler, when bit 0 (CLIENT_MYSQL) is clear.
    https://mariadb.com/kb/en/connection/#capabilities"""

    PROGRESS = 1 << 0
    COM_MULTI = 1 << 1
    STMT_BULK_OPERATIONS = 1 << 2
    EXTENDED_METADATA = 1 << 3  # column definitions carry extended type info (format=json)
    CACHE_METADATA = 1 << 4


# The extended capabilities the proxy passes through, each framed by the tracker: extended
# metadata only adds bytes inside column definitions, which it counts without reading; bulk
# execution answers like COM_STMT_EXECUTE; progress reports are ERR packets with code 0xFFFF
# before the real answer; with cached metadata a column count says whether the column
# definitions follow. COM_MULTI is not offered (MariaDB never shipped it).
PROXY_MARIADB_CAPABILITIES = (MariaDBCapability.PROGRESS
                              | MariaDBCapability.STMT_BULK_OPERATIONS
                              | MariaDBCapability.EXTENDED_METADATA
                              | MariaDBCapability.CACHE_METADATA)


# Names used in metrics, following TiProxy's cmd_type label (the Go names without "Com").
COMMAND_NAMES: dict[int, str] = {
    c.value: "".join(part.capitalize() for part in c.name.split("_")) for c in Command
}
COMMAND_NAMES[Command.QUERY] = "Query"
COMMAND_NAMES[Command.INIT_DB] = "InitDB"


class ServerStatus:
    IN_TRANS = 0x0001
    AUTOCOMMIT = 0x0002
    MORE_RESULTS_EXISTS = 0x0008
    NO_GOOD_INDEX_USED = 0x0010
    NO_INDEX_USED = 0x0020
    CURSOR_EXISTS = 0x0040
    LAST_ROW_SENT = 0x0080
    DB_DROPPED = 0x0100
    NO_BACKSLASH_ESCAPES = 0x0200
    METADATA_CHANGED = 0x0400
    QUERY_WAS_SLOW = 0x0800
    PS_OUT_PARAMS = 0x1000
    IN_TRANS_READONLY = 0x2000
    SESSION_STATE_CHANGED = 0x4000


# Header bytes of generic response packets.
OK_HEADER = 0x00
EOF_HEADER = 0xFE
ERR_HEADER = 0xFF
LOCAL_INFILE_HEADER = 0xFB
AUTH_SWITCH_HEADER = 0xFE
AUTH_MORE_DATA_HEADER = 0x01

# Cursor flags of COM_STMT_EXECUTE.
CURSOR_TYPE_NO_CURSOR = 0x00
CURSOR_TYPE_READ_ONLY = 0x01

# Error codes the proxy itself sends (with their SQLSTATE), from the server's error list.
ER_CON_COUNT_ERROR = 1040  # Too many connections, SQLSTATE 08004
ER_ACCESS_DENIED_ERROR = 1045  # Access denied, SQLSTATE 28000
ER_UNKNOWN_COM_ERROR = 1047  # Unknown command, SQLSTATE 08S01
ER_NO_SUCH_THREAD = 1094  # Unknown thread id, SQLSTATE HY000
ER_NOT_SUPPORTED_AUTH_MODE = 1251  # Client does not support authentication protocol, 08004
ER_NET_PACKET_TOO_LARGE = 1153  # SQLSTATE 08S01
ER_CONNECTION_KILLED = 1927  # MariaDB's "Connection was killed", SQLSTATE 70100

