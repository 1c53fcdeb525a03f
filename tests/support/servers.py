"""Servers a test may start, kill and cut: Redis, PostgreSQL databases, a TCP proxy."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import redis
from redis.asyncio import Redis as AsyncRedis

from humanconnect import redis_clients
from humanconnect.cli import redis_server
from humanconnect.cli.procs import free_port
from humanconnect.settings import Settings
from tests.support.env import CI

#: Keeps Redis busy for ARGV[1] µs by its own clock: its other clients wait for it (under
#: Redis's 5 s busy-reply threshold, after which they would be refused instead).
SPIN = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat
  t = redis.call('TIME')
until t[1] * 1000000 + t[2] - start > tonumber(ARGV[1])
return 1
"""


class BusyProbe:
    """Tells whether Redis is running something else (SPIN): a PING unanswered within
    250 ms. It connects when made, so that no connection of its own is made while Redis is
    busy."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url, socket_timeout=0.25)
        self.client.ping()

    def busy(self) -> bool:
        try:
            self.client.ping()
            return False
        except redis.TimeoutError:
            return True

    def close(self) -> None:
        self.client.close()


class RedisServer(redis_server.RedisServer):
    """The core's redis-server, its AOF (when asked) synced always: a test may SIGKILL it,
    `start()` it again on the same port, and find everything Redis acknowledged."""

    def __init__(
        self,
        workdir: Path,
        *,
        aof: bool = False,
        port: int | None = None,
        extra: Sequence[str] = (),
    ):
        super().__init__(workdir, aof=aof, fsync="always", port=port, extra=extra)


def create_pg_database(base_url: str) -> str:
    """A fresh, empty PostgreSQL database for one test; returns its URL."""
    import psycopg

    name = f"hc_test_{uuid.uuid4().hex[:12]}"
    admin = base_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    head, _, _ = base_url.rpartition("/")
    return f"{head}/{name}"


def drop_pg_database(base_url: str, url: str) -> None:
    import psycopg

    from humanconnect.storage.db import dispose_all

    dispose_all()
    name = url.rpartition("/")[2]
    admin = base_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class TcpProxy:
    """A loopback TCP proxy a test can cut and restore: a database 'going away' for real."""

    def __init__(self, target_host: str, target_port: int):
        import threading

        self.target = (target_host, target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._server: socket.socket | None = None

    def open(self) -> TcpProxy:
        import threading

        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def _accept(self, server: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Refuse new connections and break the open ones."""
        if self._server is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not, and
            # the socket would keep listening.
            try:
                self._server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._server.close()
            self._server = None
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


class StaticSite:
    """Files from a folder over HTTP on a loopback port of its own: another origin than the
    service's, for browser tests."""

    def __init__(self, folder: Path):
        import functools
        import http.server
        import threading

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

        self.folder = folder
        handler = functools.partial(Quiet, directory=str(folder))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def pg_or_skip() -> str:
    """The PostgreSQL to test against (HUMANCONNECT_TEST_POSTGRES_URL); skips without one,
    fails in CI, where one must be set."""
    import pytest

    base = os.environ.get("HUMANCONNECT_TEST_POSTGRES_URL", "")
    if not base:
        if CI:
            raise RuntimeError("HUMANCONNECT_TEST_POSTGRES_URL must be set in CI")
        pytest.skip("no PostgreSQL configured (set HUMANCONNECT_TEST_POSTGRES_URL)")
    return base


def web_redis(url: str) -> AsyncRedis:
    """The web's own async client (humanconnect/redis_clients.py) for a test's Redis."""
    return redis_clients.async_client(Settings.model_validate({"REDIS_URL": url}))


@contextmanager
def flushed(url: str) -> Iterator[str]:
    """The Redis database at `url`, flushed before and after."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@contextmanager
def fresh_database(kind: str, directory: Path, pg_base: str = "") -> Iterator[str]:
    """An empty, migrated database: a SQLite file in `directory`, or a new PostgreSQL
    database beside `pg_base` (dropped after)."""
    from humanconnect.storage import migrate
    from humanconnect.storage.db import dispose_all

    if kind == "sqlite":
        url = f"sqlite:///{directory / 'hc.db'}"
        migrate.upgrade(url)
        try:
            yield url
        finally:
            dispose_all()
        return
    url = create_pg_database(pg_base)
    migrate.upgrade(url)
    try:
        yield url
    finally:
        drop_pg_database(pg_base, url)
