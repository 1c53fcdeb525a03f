"""The compose files say what the documentation says they do: the Sentinel override leaves
the processes no Redis URL beside the Sentinels, keeps every data node's AOF and write
refusal (and its role across a restart), and runs three Sentinels; the base file runs the
Procfile's commands. No Docker here: the files are read as YAML, and a data node's start
script is run as it is, with this machine's redis-server."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from humanconnect.cli.procs import Process, free_port, wait_ready
from humanconnect.cli.redis_server import redis_binary

ROOT = Path(__file__).resolve().parent.parent
APPS = ("web", "worker", "beat")


class _Reset:
    """Compose's `!reset` (drop what an earlier file set), kept as a marker."""


RESET = _Reset()


class _ComposeLoader(yaml.SafeLoader):
    """A safe loader that also reads Compose's own tags."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
_ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: (
        loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node, deep=True)
        if isinstance(node, yaml.SequenceNode)
        else loader.construct_scalar(node)
    ),
)


def _load(name: str) -> dict[str, Any]:
    data = yaml.load((ROOT / name).read_text(), Loader=_ComposeLoader)
    assert isinstance(data, dict)
    return data


BASE = _load("docker-compose.yml")
SENTINEL = _load("docker-compose.sentinel.yml")


def _argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


NODE = SENTINEL["x-redis-node"]


def _data_nodes() -> dict[str, dict[str, str]]:
    """Each data node's environment (NODE_NAME, START_AS): they all run NODE's script."""
    return {
        name: {k: str(v) for k, v in service["environment"].items()}
        for name, service in SENTINEL["services"].items()
        if service.get("command") == NODE["command"]
    }


def _sentinels() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in SENTINEL["services"].items()
        if "command" in service and "--sentinel" in " ".join(_argv(service))
    }


def test_the_processes_get_sentinels_and_no_redis_url() -> None:
    """Each process is given the Sentinels and the master's name, and the base file's
    REDIS_URL is dropped (`!reset`) or empty: both set stops the process at start."""
    for name in APPS:
        env = SENTINEL["services"][name]["environment"]
        assert env["REDIS_SENTINELS"] == "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379"
        assert env["REDIS_SENTINEL_MASTER"] == "hc-primary"
        assert str(env["HUMANCONNECT_REDIS_MIN_REPLICAS"]) == "1"
        assert env.get("REDIS_URL", RESET) in (RESET, None, ""), name
        # The base file does set one, which is why the override must drop it.
        assert BASE["x-app"]["environment"]["REDIS_URL"]


def test_the_processes_wait_for_the_sentinels() -> None:
    sentinels = set(_sentinels())
    for name in APPS:
        deps = SENTINEL["services"][name]["depends_on"]
        healthy = {dep for dep, spec in deps.items() if spec is not RESET}
        assert healthy == sentinels, name
        assert all(deps[dep]["condition"] == "service_healthy" for dep in healthy)


class _Node:
    """A data node's compose script run for real on this machine: `/data` is `home`, and a
    stand-in for the image's docker-entrypoint.sh runs redis-server on a loopback port."""

    def __init__(self, home: Path, env: dict[str, str]):
        self.home = home
        self.port = free_port()
        home.mkdir(parents=True, exist_ok=True)
        bin_dir = home / "bin"
        bin_dir.mkdir(exist_ok=True)
        entry = bin_dir / "docker-entrypoint.sh"
        entry.write_text(
            "#!/bin/sh\nshift\n"  # drops "redis-server"
            f'exec {redis_binary()} "$@" --port {self.port} --bind 127.0.0.1 --daemonize no\n'
        )
        entry.chmod(0o755)
        # Compose turns `$$` into `$` before the shell sees the script.
        self.script = NODE["command"][-1].replace("$$", "$").replace("/data", str(home))
        self.env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        self.process: Process | None = None

    @property
    def conf(self) -> dict[str, str]:
        lines = (self.home / "redis.conf").read_text().splitlines()
        pairs = (line.split(" ", 1) for line in lines if line and not line.startswith("#"))
        return {key: value for key, value in pairs}

    def start(self) -> redis.Redis:
        self.process = Process("node", ["sh", "-c", self.script], self.env)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        assert wait_ready(client.ping, [self.process], 30), "the node did not start"
        return client

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(10)


def test_every_data_node_keeps_an_aof_and_refuses_writes_without_a_replica(
    tmp_path: Path,
) -> None:
    """Any data node may be the primary after a failover, so each has AOF with fsync on
    every write, noeviction, min-replicas-to-write 1, and a volume of its own; one starts
    as the primary, the others as its replicas."""
    nodes = _data_nodes()
    assert len(nodes) == 3, nodes
    starts = {name: env["START_AS"] for name, env in nodes.items()}
    primaries = [name for name, start in starts.items() if not start]
    assert len(primaries) == 1
    for name, env in nodes.items():
        node = _Node(tmp_path / name, env)
        assert (
            subprocess.run(
                ["sh", "-c", node.script.replace("exec docker-entrypoint.sh", "exit 0 #")],
                env=node.env,
                check=False,
            ).returncode
            == 0
        )
        conf = node.conf
        assert conf["appendonly"] == "yes" and conf["appendfsync"] == "always", name
        assert conf["min-replicas-to-write"] == "1", name
        assert int(conf["min-replicas-max-lag"]) > 0, name
        assert conf["maxmemory-policy"] == "noeviction", name
        assert conf["replica-announce-ip"] == name, name
        assert conf["dir"] == str(tmp_path / name)
        assert conf.get("replicaof") == (starts[name] or None), name
        if starts[name]:
            assert starts[name] == f"{primaries[0]} 6379"
    # The primary keeps the base file's volume; each replica has one of its own.
    replicas = set(nodes) - set(primaries)
    volumes = [BASE["services"][primaries[0]]["volumes"][0]] + [
        SENTINEL["services"][name]["volumes"][0] for name in sorted(replicas)
    ]
    assert len({v.split(":")[0] for v in volumes}) == 3, volumes


def test_a_promoted_replica_restarted_comes_back_a_primary(tmp_path: Path) -> None:
    """The Sentinels promote a replica with REPLICAOF NO ONE and CONFIG REWRITE: the node's
    file on its volume then says primary, and a restart (the container's) keeps it one,
    where a `--replicaof` flag would make it a replica again."""
    primary = _Node(tmp_path / "redis", _data_nodes()["redis"])
    env = _data_nodes()["redis-replica-1"]
    replica = _Node(tmp_path / "replica", {**env, "START_AS": f"127.0.0.1 {primary.port}"})
    try:
        first = primary.start()
        with pytest.raises(redis.ResponseError, match="NOREPLICAS"):  # no replica yet
            first.set("k", "v")
        client = replica.start()
        assert client.execute_command("ROLE")[0] == b"slave"
        # What a Sentinel's promotion does to it
        client.execute_command("REPLICAOF", "NO", "ONE")
        client.config_rewrite()
        replica.stop()
        again = replica.start()
        assert again.execute_command("ROLE")[0] == b"master"
        assert "replicaof" not in replica.conf
    finally:
        replica.stop()
        primary.stop()


def test_three_sentinels_with_distinct_names_and_a_quorum_of_two() -> None:
    sentinels = _sentinels()
    assert len(sentinels) == 3
    names = {service["environment"]["SENTINEL_NAME"] for service in sentinels.values()}
    assert names == set(sentinels)
    assert len({service["volumes"][0].split(":")[0] for service in sentinels.values()}) == 3
    script = next(iter(sentinels.values()))["command"][-1]
    primary = next(name for name, env in _data_nodes().items() if not env["START_AS"])
    assert f"sentinel monitor hc-primary {primary} 6379 2" in script
    for line in ("resolve-hostnames yes", "announce-hostnames yes"):
        assert f"sentinel {line}" in script
    # Sentinel rewrites its config: the file is on the Sentinel's own volume.
    assert "/data/sentinel.conf" in script


def test_the_base_file_runs_the_procfile_commands() -> None:
    """web, worker and beat in docker-compose.yml run what the Procfile runs. Two
    differences are meant: the port is fixed, and the worker has no `nice -n 10`, which
    ranks threads only within one scheduling group and a container is its own."""
    procfile = dict(
        line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip()
    )
    for name in APPS:
        expected = shlex.split(procfile[name].replace("${PORT:-8000}", "8000"))
        if expected[:3] == ["nice", "-n", "10"]:
            expected = expected[3:]
        assert _argv(BASE["services"][name]) == expected, name
