"""A TCP relay in front of a real server that cuts the connection when it sees given bytes.

For fault injection: a backend that dies in the middle of a migration's restore, at the moment
the proxy sends a chosen statement. Threads, blocking sockets; stop() closes everything.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from tiproxy.playground.ports import free_port


class CuttingRelay:
    def __init__(self, target_port: int, trigger: bytes) -> None:
        self.port = free_port()
        self.trigger = trigger
        self.cuts = 0
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = [self._listener]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._target))
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        try:
            while data := src.recv(65536):
                if watch and self.trigger in data:
                    self.cuts += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def stop(self) -> None:
        with self._lock:
            for s in self._sockets:
                s.close()
