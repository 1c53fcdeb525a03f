"""Importing a module defines things and does nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from tests.support.env import BIN, ROOT, service_env
from tests.support.processes import run_python

# Run in a fresh interpreter: the test process has imported (and configured) most of these.
PROBE = r"""
import importlib, json, pkgutil, sys

opened = []
def audit(event, args):
    if event == "open" and str(args[0]).endswith(".env"):
        opened.append(str(args[0]))
sys.addaudithook(audit)

from kombu.transport import TRANSPORT_ALIASES
before = dict(TRANSPORT_ALIASES)
result = {"imported": [], "exited": {}, "failed": {}}
for package in ("worker", "producer", "humanconnect"):
    mod = importlib.import_module(package)
    for info in pkgutil.walk_packages(mod.__path__, package + "."):
        # Alembic's env.py and revisions are scripts Alembic runs, not modules to import.
        if info.name.startswith("humanconnect.storage.migrations"):
            continue
        try:
            importlib.import_module(info.name)
            result["imported"].append(info.name)
        except SystemExit as exc:
            result["exited"][info.name] = str(exc.code)
        except Exception as exc:
            result["failed"][info.name] = repr(exc)
result["env_opened"] = opened
after = dict(TRANSPORT_ALIASES)
result["kombu_changed"] = sorted(k for k in after if after[k] != before.get(k))
print(json.dumps(result))
"""

POISON = {
    "HUMANAPI_BASE_URL": "ftp://poisoned.invalid",
    "REDIS_URL": "not-a-redis-url",
    "HUMANCONNECT_ENCRYPTION_KEYS": "not-a-fernet-key",
    "HUMANCONNECT_VISIBILITY_TIMEOUT_S": "-1",
    "DATABASE_URL": "nonsense://",
}


def test_every_module_imports_without_side_effects(tmp_path: Path) -> None:
    """With every variable malformed and a poisoned `.env` beside it, importing each module
    of worker, producer and humanconnect neither exits, nor reads `.env`, nor changes Kombu."""
    # Given a poisoned environment and .env in the working directory
    (tmp_path / ".env").write_text("HUMANAPI_BASE_URL=ftp://from-dotenv.invalid\n")
    env = service_env(**POISON, PYTHONPATH=str(ROOT))
    # When every module is imported
    proc = run_python(PROBE, cwd=tmp_path, env=env)
    result = json.loads(proc.stdout.splitlines()[-1])
    # Then all of them imported, and nothing else happened
    assert {"worker.celery", "worker.tasks", "producer.main", "humanconnect.cli.main"} <= set(
        result["imported"]
    )
    assert result["exited"] == {}
    assert result["failed"] == {}
    assert result["env_opened"] == []
    assert result["kombu_changed"] == []


def test_help_works_whatever_the_environment(tmp_path: Path) -> None:
    """`humanconnect --help` prints its usage even when every variable is malformed."""
    (tmp_path / ".env").write_text("HUMANAPI_BASE_URL=ftp://from-dotenv.invalid\n")
    proc = subprocess.run(
        [str(BIN / "humanconnect"), "--help"],
        cwd=tmp_path,
        env=service_env(**POISON),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: humanconnect")


def test_the_probe_sees_a_module_that_reads_dotenv(tmp_path: Path) -> None:
    """The audit hook above does catch a `.env` read (so the empty list means something)."""
    (tmp_path / ".env").write_text("HUMANAPI_CLIENT_ID=x\n")
    probe = PROBE.replace(
        'result["env_opened"] = opened',
        "from humanconnect.settings import get_settings\n"
        "try:\n    get_settings()\nexcept Exception:\n    pass\n"
        'result["env_opened"] = opened',
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=service_env(**POISON, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(proc.stdout.splitlines()[-1])["env_opened"] == [".env"]


# Run in a fresh interpreter too: CPython 3.11 keeps the AST converter's recursion count in
# per-interpreter state, so an `ast.parse` here racing another thread's (3.11's traceback
# module parses source to place its carets, and a server thread left by an earlier test may
# be logging one) fails with "AST constructor recursion depth mismatch" (CPython gh-106905).
GRAPH = r"""
import ast, json, pathlib, sys

ours = {"humanconnect", "producer", "worker"}
graph = {}
for package in sorted(ours):
    for path in sorted(pathlib.Path(package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        graph[str(path)] = sorted(names & ours)
print(json.dumps(graph))
"""


def test_dependencies_point_one_way() -> None:
    """The core (humanconnect) imports neither process; the web (producer) and the Celery
    process (worker) import the core and never each other."""
    allowed = {"humanconnect": {"humanconnect"}, "producer": {"humanconnect", "producer"}}
    allowed["worker"] = {"humanconnect", "worker"}
    proc = run_python(GRAPH, cwd=ROOT)
    graph: dict[str, list[str]] = json.loads(proc.stdout)
    # The probe saw the tree (an empty walk would pass the check below vacuously)
    assert "producer/main.py" in graph and "worker/celery.py" in graph
    assert "humanconnect" in graph["producer/main.py"]
    wrong = {
        path: sorted(set(imported) - allowed[path.split("/")[0]])
        for path, imported in graph.items()
        if set(imported) - allowed[path.split("/")[0]]
    }
    assert wrong == {}


def test_the_old_embedding_import_still_works_with_a_warning() -> None:
    """`worker.users.get_user_tokens` (the import embedding apps used) warns and answers
    what `humanconnect.users.get_user_tokens` answers."""
    from humanconnect import users
    from worker.users import get_user_tokens

    with mock.patch.object(users, "get_user_tokens", return_value=None) as new:
        with pytest.warns(DeprecationWarning, match="humanconnect.users.get_user_tokens"):
            assert get_user_tokens("someone") is None
    new.assert_called_once_with("someone")
