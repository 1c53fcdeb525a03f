"""The compose files say what the documentation says they do: the Sentinel override leaves
the processes no Redis URL beside the Sentinels, keeps every data node's AOF and write
refusal, and runs three Sentinels; the base file runs the Procfile's commands. No Docker
here: the files are read as YAML."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

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


def _option(argv: list[str], name: str) -> str | None:
    """The value after `--name` on a redis-server command line."""
    flag = f"--{name}"
    return argv[argv.index(flag) + 1] if flag in argv else None


def _data_nodes() -> dict[str, list[str]]:
    return {
        name: _argv(service)
        for name, service in SENTINEL["services"].items()
        if "command" in service and _argv(service)[0] == "redis-server"
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


def test_every_data_node_keeps_an_aof_and_refuses_writes_without_a_replica() -> None:
    """Any data node may be the primary after a failover, so each has AOF with fsync on
    every write, noeviction, min-replicas-to-write 1, and a volume of its own."""
    nodes = _data_nodes()
    primaries = [name for name, argv in nodes.items() if "--replicaof" not in argv]
    assert len(primaries) == 1 and len(nodes) == 3, nodes
    for name, argv in nodes.items():
        assert _option(argv, "appendonly") == "yes", name
        assert _option(argv, "appendfsync") == "always", name
        assert _option(argv, "min-replicas-to-write") == "1", name
        assert int(_option(argv, "min-replicas-max-lag") or 0) > 0, name
        assert _option(argv, "maxmemory-policy") == "noeviction", name
        assert _option(argv, "replica-announce-ip") == name, name
    replicas = set(nodes) - set(primaries)
    for name in replicas:
        assert nodes[name][nodes[name].index("--replicaof") + 1] == primaries[0]
    # The primary keeps the base file's volume; each replica has one of its own.
    volumes = [BASE["services"][primaries[0]]["volumes"][0]] + [
        SENTINEL["services"][name]["volumes"][0] for name in sorted(replicas)
    ]
    assert len({v.split(":")[0] for v in volumes}) == 3, volumes


def test_three_sentinels_with_distinct_names_and_a_quorum_of_two() -> None:
    sentinels = _sentinels()
    assert len(sentinels) == 3
    names = {service["environment"]["SENTINEL_NAME"] for service in sentinels.values()}
    assert names == set(sentinels)
    assert len({service["volumes"][0].split(":")[0] for service in sentinels.values()}) == 3
    script = next(iter(sentinels.values()))["command"][-1]
    primary = next(name for name, argv in _data_nodes().items() if "--replicaof" not in argv)
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
