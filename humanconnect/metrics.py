"""The worker's metrics, kept in Redis so that `GET /metrics` on any web process shows the
whole deployment (workers may run on other hosts than the web).

Counters are `HINCRBY` on one hash; a histogram is a counter per bucket plus sum and count.
Label values are fixed words chosen here, never data from a request.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from humanconnect.redis_keys import METRICS as KEY
from humanconnect.states import ErrorKind, RequestState

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

COUNTERS = {
    "exchanges": (
        "humanconnect_exchanges",
        "Exchanges by outcome (succeeded, failed, answer_lost, ...)",
    ),
    "retries": ("humanconnect_retries", "Upstream retries by cause"),
    "mints": (
        "humanconnect_mints",
        "Current-flow token mints by kind (connect, access) and outcome (ok, unavailable, refused)",
    ),
    "repairs": ("humanconnect_repairs", "publicToken repairs by outcome"),
    "events": ("humanconnect_events_relayed", "Events relayed to the stream"),
    "webhooks": (
        "humanconnect_webhook_attempts",
        "Webhook delivery attempts by outcome (delivered, retrying, failed)",
    ),
}
#: Label values a counter shows from the start, at 0 until counted: Prometheus sees no
#: increase in a series' first sample, so an alert on the first answer_lost needs it there.
KNOWN = {
    "exchanges": ("outcome", (RequestState.SUCCEEDED, *ErrorKind)),
    "webhooks": ("outcome", ("delivered", "retrying", "failed")),
}
HISTOGRAMS = {
    "upstream_seconds": ("humanconnect_upstream_seconds", "Upstream call latency in seconds"),
    "webhook_seconds": (
        "humanconnect_webhook_delivery_seconds",
        "From an event's commit to its delivery's 2xx, in seconds",
    ),
}


def _field(name: str, labels: dict[str, str]) -> str:
    return name + "|" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def inc(r: redis.Redis, name: str, amount: int = 1, **labels: str) -> None:
    """Add to a counter; a metrics failure never fails the work it measures."""
    try:
        r.hincrby(KEY, _field(name, labels), amount)
    except redis.exceptions.RedisError:
        log.debug("metric %s not recorded", name)


def queue_inc(pipe: Any, name: str, amount: int = 1, **labels: str) -> None:
    """`inc`, added to a pipeline the caller executes."""
    pipe.hincrby(KEY, _field(name, labels), amount)


def queue_observe(pipe: Any, name: str, values: list[float], **labels: str) -> None:
    """`observe_many`, added to a pipeline the caller executes."""
    if not values:
        return
    # One field per observation, in its own bucket (not cumulative): a fast call would
    # otherwise touch every bucket. The scrape adds them up (see `_histograms`).
    counts: dict[str, int] = defaultdict(int)
    for v in values:
        counts[next((str(b) for b in LATENCY_BUCKETS if v <= b), "+Inf")] += 1
    for bound, n in counts.items():
        pipe.hincrby(KEY, _field(name + ":bucket", {**labels, "le": bound}), n)
    pipe.hincrbyfloat(KEY, _field(name + ":sum", labels), sum(values))
    pipe.hincrby(KEY, _field(name + ":count", labels), len(values))


def observe_many(r: redis.Redis, name: str, values: list[float], **labels: str) -> None:
    """Record a batch of observations in one round trip."""
    if not values:
        return
    try:
        pipe = r.pipeline(transaction=False)
        queue_observe(pipe, name, values, **labels)
        pipe.execute()
    except redis.exceptions.RedisError:
        log.debug("metric %s not recorded", name)


def _parse(field: str) -> tuple[str, dict[str, str]]:
    name, _, rest = field.partition("|")
    labels = dict(pair.split("=", 1) for pair in rest.split(",") if pair)
    return name, labels


class RedisCollector(Collector):
    """Exposes the Redis-kept worker metrics, plus gauges computed at scrape time."""

    def __init__(self, r: redis.Redis, gauges: dict[str, Any]):
        self.r = r
        #: name -> (help, function returning the value, or a value per endpoint); a
        #: failing gauge is skipped.
        self.gauges = gauges

    def collect(self) -> Iterator[Any]:
        try:
            raw = self.r.hgetall(KEY)
        except redis.exceptions.RedisError:
            raw = {}
        values = {_key(k): float(v) for k, v in raw.items()}
        yield from self._counters(values)
        yield from self._histograms(values)
        for name, (help_, fn) in self.gauges.items():
            try:
                value = fn()
            except Exception:  # a scrape must not fail on one gauge
                continue
            if isinstance(value, dict):
                # One series per endpoint (the one labelled gauge: webhook backlogs).
                gauge = GaugeMetricFamily(name, help_, labels=["endpoint"])
                for label, v in value.items():
                    gauge.add_metric([label], v)
            else:
                gauge = GaugeMetricFamily(name, help_)
                gauge.add_metric([], value)
            yield gauge

    def _counters(self, values: dict[str, float]) -> Iterator[CounterMetricFamily]:
        for key, (metric, help_) in COUNTERS.items():
            series = [
                (labels, v) for f, v in values.items() for n, labels in [_parse(f)] if n == key
            ]
            label, known = KNOWN.get(key, ("", ()))
            seen = {labels.get(label) for labels, _ in series}
            series += [({label: str(v)}, 0.0) for v in known if v not in seen]
            names = sorted({k for labels, _ in series for k in labels})
            family = CounterMetricFamily(metric, help_, labels=names)
            for labels, v in series:
                family.add_metric([labels.get(n, "") for n in names], v)
            yield family

    def _histograms(self, values: dict[str, float]) -> Iterator[HistogramMetricFamily]:
        for key, (metric, help_) in HISTOGRAMS.items():
            groups: dict[tuple[tuple[str, str], ...], dict[str, float]] = defaultdict(dict)
            for f, v in values.items():
                name, labels = _parse(f)
                if name == key + ":bucket":
                    le = labels.pop("le")
                    groups[tuple(sorted(labels.items()))][le] = v
                elif name in (key + ":sum", key + ":count"):
                    groups[tuple(sorted(labels.items()))][name.rsplit(":", 1)[1]] = v
            names = sorted({k for g in groups for k, _ in g})
            family = HistogramMetricFamily(metric, help_, labels=names)
            for group, data in groups.items():
                labels = dict(group)
                cumulative = 0.0
                buckets = []
                for b in LATENCY_BUCKETS:
                    cumulative += data.get(str(b), 0.0)
                    buckets.append((str(b), cumulative))
                buckets.append(("+Inf", data.get("count", 0.0)))
                family.add_metric(
                    [labels.get(n, "") for n in names], buckets, sum_value=data.get("sum", 0.0)
                )
            yield family


def _key(k: bytes | str) -> str:
    return k.decode() if isinstance(k, bytes) else k
