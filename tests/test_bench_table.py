"""The benchmark page shows each scenario's newest figures, whichever run measured them."""

from __future__ import annotations

import json
from pathlib import Path

from docs.hooks.bench_table import latest_table


def _record(path: Path, started: str, rows: list[tuple[str, str, float]]) -> None:
    figures = [{"scenario": s, "figure": f, "value": v, "unit": "ms"} for s, f, v in rows]
    path.write_text(
        json.dumps({"started": started, "command": "python -m bench", "figures": figures})
    )


def test_a_run_of_one_scenario_hides_only_that_scenarios_older_figures(tmp_path: Path) -> None:
    # Given a full run, then a run of `replicas` alone, then one of `drain` alone
    _record(
        tmp_path / "2026-01-01T00-00-00Z.json",
        "old",
        [("saturation", "a", 1.0), ("replicas", "b", 2.0), ("drain", "c", 3.0)],
    )
    _record(tmp_path / "2026-01-02T00-00-00Z.json", "mid", [("replicas", "b", 20.0)])
    _record(tmp_path / "2026-01-03T00-00-00Z.json", "new", [("drain", "c", 30.0)])
    _record(tmp_path / "2025-12-31T00-00-00Z.json", "older", [("drain", "c", 0.5)])

    page = latest_table(tmp_path)

    # Then each scenario appears once, with its newest run's figure, newest run first
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert rows == [
        "| `drain` | c | 30.0 ms |",
        "| `replicas` | b | 20.0 ms |",
        "| `saturation` | a | 1.00 ms |",
    ]
    assert page.index("started new") < page.index("started mid") < page.index("started old")
    # And a run every figure of which a newer one replaced is not shown at all
    assert "started older" not in page


def test_no_record_says_so(tmp_path: Path) -> None:
    assert "No result recorded yet" in latest_table(tmp_path)
