"""Prometheus metrics, read at scrape time so the message path pays nothing.

The manager, the message log and the server keep plain counters (ints in dicts); the Collector
here turns them into metric families only when ``/metrics`` is scraped. It has its own
CollectorRegistry per server, so several servers in one process (tests) never collide. This
module must not import trio, quart or apsw.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping

PREFIX: Final = "nodejob_"
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

LABEL_NAMES: Final = {
    "jobs_started_total": "strategy",
    "jobs_finished_total": "status",
    "http_responses_total": "code",
}
"""The label a dict-valued statistic is broken down by; other dicts use ``key``."""

HELP: Final = {
    "jobs_running": "Jobs currently running.",
    "jobs_starting": "Jobs accepted and waiting for a slot or launching.",
    "jobs_in_memory": "Jobs in the in-memory registry: unfinished ones, and finished ones the "
    "cleanup has not yet forgotten.",
    "jobs_started_total": "Jobs started, by execution strategy.",
    "jobs_finished_total": "Jobs that reached a terminal state, by status.",
    "ws_connections_open": "Open WebSocket connections.",
    "ws_connections_total": "WebSocket connections accepted.",
    "ws_commands_total": "WebSocket commands received.",
    "ws_messages_sent_total": "Job messages sent over WebSockets.",
    "sse_streams_open": "Open server-sent event streams.",
    "http_responses_total": "HTTP responses, by status code.",
}

_INVALID: Final = re.compile(r"[^a-zA-Z0-9_]")


@dataclass(slots=True)
class ServerStats:
    """The server's own counters, bumped per connection, command or batch (never per message)."""

    ws_connections: int = 0
    ws_connections_total: int = 0
    ws_commands_total: int = 0
    ws_messages_sent_total: int = 0
    sse_streams: int = 0
    http_responses: Counter[int] = field(default_factory=Counter)

    def snapshot(self) -> dict[str, Any]:
        return {
            "ws_connections_open": self.ws_connections,
            "ws_connections_total": self.ws_connections_total,
            "ws_commands_total": self.ws_commands_total,
            "ws_messages_sent_total": self.ws_messages_sent_total,
            "sse_streams_open": self.sse_streams,
            "http_responses_total": {str(k): v for k, v in self.http_responses.items()},
        }


class StatsCollector(Collector):
    """Exposes the dicts returned by ``sources`` (called at scrape time) as metric families.

    ``sources`` pairs a name prefix (``""``, ``"log_"``) with a callable returning
    ``{name: number}`` or ``{name: {label_value: number}}``. Names ending in ``_total`` become
    counters, the rest gauges.
    """

    def __init__(self, sources: Iterable[tuple[str, Callable[[], Mapping[str, Any]]]]) -> None:
        self._sources = list(sources)

    def collect(self) -> Iterator[Metric]:
        for prefix, source in self._sources:
            for name, value in source().items():
                metric = _family(prefix, name, value)
                if metric is not None:
                    yield metric

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families depend on what the sources report; nothing to pre-register


def _family(prefix: str, name: str, value: Any) -> Metric | None:
    documentation = HELP.get(name, name.replace("_", " "))
    full = PREFIX + _INVALID.sub("_", prefix + name)
    counter = full.endswith("_total")
    base = full.removesuffix("_total") if counter else full
    if isinstance(value, dict):
        label = LABEL_NAMES.get(name, "key")
        metric: CounterMetricFamily | GaugeMetricFamily
        if counter:
            metric = CounterMetricFamily(base, documentation, labels=[label])
        else:
            metric = GaugeMetricFamily(base, documentation, labels=[label])
        for key, number in sorted(value.items(), key=lambda kv: str(kv[0])):
            if _is_number(number):
                metric.add_metric([str(key)], float(number))
        return metric
    if not _is_number(value):
        return None
    if counter:
        return CounterMetricFamily(base, documentation, value=float(value))
    return GaugeMetricFamily(base, documentation, value=float(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def make_registry(
    sources: Iterable[tuple[str, Callable[[], Mapping[str, Any]]]],
) -> CollectorRegistry:
    """A fresh registry: a StatsCollector over ``sources``, plus the process's CPU and memory."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(sources))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of everything in ``registry``."""
    return generate_latest(registry)
