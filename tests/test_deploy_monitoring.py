"""deploy/: the alert rules pass promtool's check and their unit tests, the dashboard loads,
and every metric (and label value) a rule or a panel names is one the service's /metrics shows.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from fastapi.testclient import TestClient

from humanconnect import metrics
from humanconnect.errors import CircuitOpen, TransientUpstreamError
from humanconnect.upstream.retry import retry_cause
from tests.support.env import CI, ROOT
from tests.support.hooks import SECRET

RULES = ROOT / "deploy/prometheus/alerts.yml"
RULE_TESTS = ROOT / "deploy/prometheus/alerts.test.yml"
DASHBOARD = ROOT / "deploy/grafana/humanconnect.json"
#: Grafana's variables, as Prometheus would see them once Grafana filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".+"}

QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
NAME = re.compile(r"(?<![\w:])humanconnect_\w+")
SELECTOR = re.compile(r"(?<![\w:])(humanconnect_\w+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
#: The series each type of metric family puts in Prometheus (text format 0.0.4's # TYPE names).
SERIES_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = (
            "promtool is not on PATH (Debian's `prometheus` package has it; .ci/run installs it)"
        )
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def _rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _graphs(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but the rows, including those inside a collapsed row."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return found


def _panel_exprs() -> list[str]:
    exprs = [t["expr"] for p in _graphs(_dashboard()) for t in p["targets"]]
    for variable, value in GRAFANA_VARIABLES.items():
        exprs = [e.replace(variable, value) for e in exprs]
    return exprs


def _exprs() -> list[str]:
    return [rule["expr"] for rule in _rules()] + _panel_exprs()


# -- the rules ---------------------------------------------------------------------------------


def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    """`promtool check rules` accepts alerts.yml and `promtool test rules` passes."""
    promtool = _promtool()
    checked = _run(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _run(promtool, "test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_rule_is_tested_firing_and_quiet() -> None:
    """Each alert has a test case where it fires and one where it must stay quiet."""
    cases = [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    names = {rule["alert"] for rule in _rules()}
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert sorted(names - fired) == [], "alerts no test sees fire"
    assert sorted(names - quiet) == [], "alerts no test sees stay quiet"


def test_every_rule_tells_an_operator_what_to_do() -> None:
    """Each rule has a severity and a summary and description, as the docs' table asks."""
    for rule in _rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # One rule per row of docs/operations/metrics.md's "What to alert on".
    table = (ROOT / "docs/operations/metrics.md").read_text().split("## What to alert on")[1]
    rows = [line for line in table.split("\n## ")[0].splitlines() if line.startswith("| `")]
    assert len(_rules()) == len(rows)


def test_the_dashboards_queries_parse(tmp_path: Path) -> None:
    """Every panel's PromQL, its Grafana variables filled in, is valid to promtool."""
    promtool = _promtool()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"panel_query_{i}", "expr": e} for i, e in enumerate(_panel_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = _run(promtool, "check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- the dashboard -----------------------------------------------------------------------------


def test_the_dashboard_loads_with_a_query_in_every_panel() -> None:
    """The dashboard is JSON Grafana imports: a Prometheus datasource variable, unique panel
    ids, and every panel titled with at least one query on that datasource."""
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]] + [
        p["id"] for row in dashboard["panels"] for p in row.get("panels", [])
    ]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    graphs = _graphs(dashboard)
    assert len(graphs) >= 12
    for panel in graphs:
        assert panel.get("title"), panel["id"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel.get("targets"), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert NAME.search(target["expr"]), f"{panel['title']}: no humanconnect metric"


def test_the_dashboard_covers_what_the_issue_lists() -> None:
    """Panels for finishes by outcome, accept latency, queue depth, exchanges, the upstream's
    rate against its limit, the breaker, retries, repair and webhooks."""
    by_title = {
        p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in _graphs(_dashboard())
    }
    wanted = {
        "Finishes by outcome": "humanconnect_finishes_total",
        "Accept latency": "humanconnect_accept_seconds_bucket",
        "Queue depth": "humanconnect_queue_depth",
        "Exchange outcomes": "humanconnect_exchanges_total",
        "Upstream latency": "humanconnect_upstream_seconds_bucket",
        "Upstream rate vs limit": "humanconnect_upstream_limit_rps",
        "Circuit breaker": "humanconnect_breaker_open",
        "Retries by cause": "humanconnect_retries_total",
        "publicToken repairs": "humanconnect_repairs_total",
        "Webhook backlog": "humanconnect_webhook_backlog",
        "Webhook delivery latency": "humanconnect_webhook_delivery_seconds_bucket",
    }
    for title, metric in wanted.items():
        assert metric in by_title.get(title, ""), title


# -- every name is one /metrics shows ----------------------------------------------------------


@pytest.fixture
def exposition(make_client: Callable[..., TestClient], redis_client: redis.Redis) -> str:
    """The service's /metrics, with a webhook endpoint and the retry causes the rules watch
    counted the way the workers count them."""
    for exc in (TransientUpstreamError("upstream 503", status=503), CircuitOpen("paused")):
        metrics.inc(redis_client, "retries", cause=retry_cause(exc), where="queue")
    client = make_client(
        HUMANCONNECT_WEBHOOK_URLS="https://hooks.example/humanconnect",
        HUMANCONNECT_WEBHOOK_SECRET=SECRET,
    )
    resp = client.get("/metrics")
    assert resp.status_code == 200
    return resp.text


def _exposed(text: str) -> tuple[set[str], dict[str, list[dict[str, str]]]]:
    """The series names Prometheus would store from this text, and each one's label sets."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ")
            names |= {family + suffix for suffix in SERIES_SUFFIXES.get(kind, ("",))}
    labels: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            labels.setdefault(name.split(" ")[0], []).append(
                {k: v for k, _, v in MATCHER.findall(rest.rpartition("}")[0])}
            )
    return names, labels


def _unknown_names(exprs: Iterable[str], exposed: set[str]) -> list[str]:
    named = {n for e in exprs for n in NAME.findall(QUOTED.sub('""', e))}
    return sorted(named - exposed)


def _unmatched_labels(exprs: Iterable[str], labels: dict[str, list[dict[str, str]]]) -> list[str]:
    """Selectors whose `=` or `=~` matcher no exposed series of that name satisfies (`job` is
    Prometheus's own label, and a name with no series yet is for `_unknown_names` alone)."""
    problems = []
    for expr in exprs:
        for name, matchers in SELECTOR.findall(expr):
            seen = labels.get(name, [])
            for label, op, value in MATCHER.findall(matchers):
                if label == "job" or op not in ("=", "=~") or not seen:
                    continue
                # A plain alternation (`a|b`) needs each word; another regex, any match.
                words = value.split("|") if op == "=~" and re.fullmatch(r"[\w|]+", value) else []
                for wanted in words or [value]:
                    pattern = re.escape(wanted) if op == "=" or words else wanted
                    if not any(re.fullmatch(pattern, s.get(label, "")) for s in seen):
                        problems.append(f'{name}{{{label}{op}"{wanted}"}}')
    return sorted(set(problems))


def test_every_metric_a_rule_or_panel_names_is_in_metrics(exposition: str) -> None:
    """Each humanconnect_ series in alerts.yml and the dashboard is one /metrics exposes (a
    counter as _total, a histogram as _bucket/_sum/_count), with the label values it selects."""
    exposed, labels = _exposed(exposition)
    exprs = _exprs()
    named = {n for e in exprs for n in NAME.findall(QUOTED.sub('""', e))}
    assert len(named) >= 15, sorted(named)
    assert _unknown_names(exprs, exposed) == []
    assert _unmatched_labels(exprs, labels) == []


def test_the_name_check_catches_a_made_up_metric(exposition: str) -> None:
    """The check above fails on a name /metrics lacks, a counter without _total, a histogram
    without its suffix and a label value never counted; a name inside a string is no name."""
    exposed, labels = _exposed(exposition)
    made_up = [
        "rate(humanconnect_made_up_total[5m]) > 0",
        "rate(humanconnect_finishes[5m]) > 0",
        "humanconnect_upstream_seconds > 1",
        'humanconnect_queue_depth{queue="humanconnect_not_a_metric"} > 0',
    ]
    assert _unknown_names(made_up, exposed) == [
        "humanconnect_finishes",
        "humanconnect_made_up_total",
        "humanconnect_upstream_seconds",
    ]
    typos = [
        'humanconnect_finishes_total{outcome="refused",reason="queue_unavailabe"}',
        'humanconnect_exchanges_total{outcome=~"transient|internl"}',
        'humanconnect_finishes_total{job="web",outcome="refused",reason="backlog_full"}',
    ]
    assert _unmatched_labels(typos, labels) == [
        'humanconnect_exchanges_total{outcome=~"internl"}',
        'humanconnect_finishes_total{reason="queue_unavailabe"}',
    ]
