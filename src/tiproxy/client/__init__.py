"""The proxy's own side of the MySQL protocol towards backends: a backend connection (`leg`),
statements on a detached one (`channel`), and the proxy's own logins (`admin`). The sessions'
relay, migration, KILL, health checks and credential sync all use it; it imports nothing of
theirs."""
