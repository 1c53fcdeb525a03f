"""CONTRIBUTING.md's tree of the three packages is the tree: a module added, moved or removed
without its line there fails here, so a newcomer's map cannot drift."""

from __future__ import annotations

import re

from tests.support.env import ROOT

PACKAGES = ("humanconnect", "producer", "worker")


def _tree_paths() -> set[str]:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    paths: set[str] = set()
    parents: list[str] = []
    for line in block.splitlines():
        match = re.match(r"( *)(\S+)", line)
        if not match:
            continue
        depth = len(match.group(1)) // 2
        name = match.group(2)
        parents = parents[:depth]
        path = "/".join([*parents, name.rstrip("/")])
        paths.add(path)
        if name.endswith("/"):
            parents.append(name.rstrip("/"))
    return paths


def _modules() -> set[str]:
    found: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            # Alembic's revisions are one entry (migrations/); __init__ files hold no concept.
            if "/migrations/" in rel or path.name == "__init__.py" or "__pycache__" in rel:
                continue
            found.add(rel)
    return found


def test_the_contributing_tree_names_every_module_and_nothing_else() -> None:
    listed = _tree_paths()
    modules = _modules()
    assert sorted(modules - listed) == [], "modules missing from CONTRIBUTING.md's tree"
    stale = sorted(
        p
        for p in listed
        if p.startswith(tuple(f"{pkg}/" for pkg in PACKAGES)) and not (ROOT / p).exists()
    )
    assert stale == [], "CONTRIBUTING.md's tree names paths that are not there"
