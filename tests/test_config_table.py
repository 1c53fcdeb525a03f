"""The configuration page's table and the settings object name the same variables, so the
documentation cannot drift from what the processes read."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import AliasChoices
from pydantic.fields import FieldInfo

from humanconnect.settings import Settings

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
HEADER = "| variable | default | meaning |"


def _env_names(name: str, field: FieldInfo) -> set[str]:
    """The environment variables pydantic-settings reads for one field: its validation
    aliases, else its alias, else the prefix plus the field's name."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return {c for c in alias.choices if isinstance(c, str)}
    if isinstance(alias, str):
        return {alias}
    if field.alias:
        return {field.alias}
    return {f"{Settings.model_config.get('env_prefix', '')}{name}"}


def _settings_vars() -> dict[str, FieldInfo]:
    names: dict[str, FieldInfo] = {}
    for name, field in Settings.model_fields.items():
        for env in _env_names(name, field):
            # Case-insensitive unless the settings say otherwise; the page spells them upper.
            key = env if Settings.model_config.get("case_sensitive") else env.upper()
            names[key] = field
    return names


def _table() -> dict[str, str]:
    """The page's variable table: each variable with its default cell."""
    lines = PAGE.read_text().splitlines()
    start = lines.index(HEADER)
    rows: dict[str, str] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        match = re.fullmatch(r"`([A-Z0-9_]+)`", cells[0])
        assert match, f"not one `VARIABLE` in the first cell: {line}"
        assert match.group(1) not in rows, f"{match.group(1)} is in the table twice"
        rows[match.group(1)] = cells[1]
    return rows


def _same(cell: str, default: object) -> bool:
    """A literal default cell (`20`, `60/minute`, `1`, `0,5,300`) against the field's default."""
    if isinstance(default, bool):
        return cell == ("1" if default else "0")
    if isinstance(default, int | float):
        return float(cell) == float(default)
    if isinstance(default, list | tuple):  # a comma-separated variable
        return cell == ",".join(str(item) for item in default)
    return cell == str(default)


def test_every_setting_is_in_the_table() -> None:
    """Every variable the settings read has a row on the configuration page."""
    missing = set(_settings_vars()) - set(_table())
    assert not missing, f"add to docs/configuration.md: {sorted(missing)}"


def test_the_table_names_only_settings() -> None:
    """The table names no variable the settings object does not read."""
    unknown = set(_table()) - set(_settings_vars())
    assert not unknown, f"not read by humanconnect/settings.py: {sorted(unknown)}"


def test_literal_defaults_match_the_settings() -> None:
    """Where the table gives a default as one literal, it is the field's default."""
    fields = _settings_vars()
    wrong = {}
    for var, cell in _table().items():
        literal = re.fullmatch(r"`([^`]*)`", cell)
        if literal and var in fields and not _same(literal.group(1), fields[var].default):
            wrong[var] = (literal.group(1), fields[var].default)
    assert not wrong, f"defaults differ (table, settings): {wrong}"
