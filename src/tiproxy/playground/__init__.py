"""Throwaway local MariaDB servers for the `tiproxy playground` command and the test suite."""
