"""MkDocs hook: renders the `make bench` records (bench/results/*.json) into the benchmark
page at build time, where the page says `<!-- bench:latest -->`: each scenario's figures from
the newest run that measured it, so a run of one scenario (`--only replicas`) does not hide
the others' figures, and nobody copies them by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER = "<!-- bench:latest -->"


def _results_dir(config: Any) -> Path:
    return Path(config["config_file_path"]).parent / "bench" / "results"


def _value(value: Any, unit: str) -> str:
    if isinstance(value, dict):
        text = ", ".join(f"{count} × {code}" for code, count in value.items())
    elif isinstance(value, float):
        text = f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    # "5.1 ms", but "200/s", "83%" and "0.83×".
    return f"{text}{unit}" if unit.startswith(("/", "%", "×")) else f"{text} {unit}".strip()


def _load(machine: dict[str, Any]) -> str:
    """The machine's 1-minute load average at the run's start and end, where recorded."""
    parts = [
        f"{machine[key]} at the {when}"
        for key, when in (("load_average_1m_start", "start"), ("load_average_1m_end", "end"))
        if key in machine
    ]
    return f"; load average {' and '.join(parts)}" if parts else ""


def render(record: dict[str, Any], name: str, skip: frozenset[str] = frozenset()) -> str:
    """The record as Markdown: when and how it was made, on what, then one row per figure
    (but those of the scenarios in `skip`)."""
    machine = record.get("machine", {})
    lines = [
        f"Run `{name}`, started {record.get('started', '?')}, "
        f"{record.get('wall_s', '?')} s wall, on {machine.get('cores', '?')} cores "
        f"(Python {machine.get('python', '?')}, {machine.get('platform', '?')})"
        + _load(machine)
        + ".",
        "",
        "```sh",
        record.get("command", "python -m bench"),
        "```",
        "",
        "| scenario | figure | value |",
        "|---|---|---|",
    ]
    for row in record.get("figures", []):
        if row["scenario"] in skip:
            continue
        figure = str(row["figure"]).replace("|", "\\|")
        value = _value(row["value"], row.get("unit", "")).replace("|", "\\|")
        lines.append(f"| `{row['scenario']}` | {figure} | {value} |")
    return "\n".join(lines)


def latest_table(results_dir: Path) -> str:
    """Each scenario's newest figures, a run at a time, newest first; or a note that no run is
    recorded yet."""
    records = sorted(results_dir.glob("*.json"), reverse=True)
    if not records:
        return (
            '!!! note "No result recorded yet"\n'
            "    No run is recorded in `bench/results/` yet. Run `make bench` (or one scenario, "
            "`make bench BENCH_ARGS='--only saturation'`) and commit the JSON it writes."
        )
    shown: set[str] = set()
    parts = []
    for path in records:
        record = json.loads(path.read_text())
        scenarios = {row["scenario"] for row in record.get("figures", [])}
        if scenarios <= shown:
            continue  # every figure it has, a newer run measured again
        parts.append(render(record, path.name, frozenset(shown)))
        shown |= scenarios
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs' page hook: replace the marker on whichever page has it."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, latest_table(_results_dir(config)))
