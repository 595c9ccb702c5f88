"""docs/grafana-dashboard.json: importable as it is, with the panels an on-call
person opens first, and every query naming only metrics and labels that a live
``/metrics`` of the daemon on a real circusd serves, so it cannot drift from
the code.

Queries are read with the PromQL tokenizer of the alert-rule tests, after
Grafana's own step: its variables replaced, as Grafana does before it sends a
query. ``job`` and ``instance`` are the labels Prometheus gives every series of
a scrape target; ``/metrics`` cannot show them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from support import Circusd, Standalone, free_udp_port, http_get, wait_pids, worker_cmd
from test_docs_operations import promql_names

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
TARGET_LABELS = frozenset({"job", "instance"})
DATASOURCE = "${DS_PROMETHEUS}"  # the input Grafana asks for at import
# Grafana's interval variable, as Grafana fills it in (a range of 4 scrapes).
INTERVALS = {"$__rate_interval": "1m"}
LABEL_VALUES = re.compile(r"label_values\((?P<expr>.+),\s*(?P<label>\w+)\)")

# What an on-call person opens first: metric -> the label it is split by.
ON_CALL = {
    "circus_watchdog_circusd_connected": None,
    "circus_watchdog_monitored_pids": None,
    "circus_watchdog_heartbeats_total": None,
    "circus_watchdog_unknown_pid_total": None,
    "circus_watchdog_malformed_total": None,
    "circus_watchdog_kills_total": "watcher",
    "circus_watchdog_kills_held_total": "reason",
    "circus_watchdog_kill_failures_total": None,
    "circus_watchdog_kernel_drops_total": None,
    "process_cpu_seconds_total": None,
}

Served = dict[str, frozenset[str]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


class Query:
    """One PromQL query of the dashboard, where it is, and the labels its
    result is shown by (a legend, or a variable's values)."""

    def __init__(self, where: str, expr: str, shown: set[str]) -> None:
        self.where, self.expr, self.shown = where, expr, shown
        for variable, value in INTERVALS.items():
            expr = expr.replace(variable, value)
        self.grouping, self.metrics = promql_names(expr)

    def __repr__(self) -> str:
        return f"{self.where}: {self.expr}"


def queries() -> Iterator[Query]:
    """Every panel target and every query variable."""
    data = dashboard()
    for panel in data["panels"]:
        for target in panel["targets"]:
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]))
            yield Query(f"panel {panel['title']!r}", target["expr"], legend)
    for variable in data["templating"]["list"]:
        match = LABEL_VALUES.fullmatch(variable["query"]["query"])
        assert match, variable["query"]
        assert variable["definition"] == variable["query"]["query"]
        yield Query(f"${variable['name']}", match["expr"], {match["label"]})


def problems(served: Served, checked: Iterable[Query] | None = None) -> list[str]:
    """What in the dashboard's queries (or ``checked``) ``served`` (sample
    name -> label names, from one scrape) does not expose."""
    found = []
    for query in queries() if checked is None else checked:
        labels: set[str] = set(TARGET_LABELS)
        for name, matched in query.metrics.items():
            if name not in served:
                found.append(f"{query!r}: {name} is not served")
                continue
            labels |= served[name]
            for label in matched - served[name] - TARGET_LABELS:
                found.append(f"{query!r}: {name} has no label {label}")
        for label in query.grouping - labels:
            found.append(f"{query!r}: no label {label} to group by")
        # A legend can show only the labels the result keeps.
        kept = query.grouping | TARGET_LABELS if "by" in query.expr else labels
        for label in query.shown - kept:
            found.append(f"{query!r}: shows {label}, which the result has not")
    return found


def served_labels(text: str) -> Served:
    """Sample name -> every label name it carries, from a /metrics body."""
    served: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            served.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in served.items()}


def test_importable() -> None:
    """One Prometheus input, used by every panel, target and variable; unique
    ids and refIds; panels inside Grafana's 24 columns, none over another."""
    data = dashboard()
    (source,) = data["__inputs"]
    assert (source["name"], source["type"], source["pluginId"]) == (
        "DS_PROMETHEUS",
        "datasource",
        "prometheus",
    )
    assert data["uid"] and data["title"] and isinstance(data["schemaVersion"], int)
    panels = data["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(set(refs)) == len(refs), panel["title"]
        assert {t["datasource"]["uid"] for t in panel["targets"]} == {DATASOURCE}
        box = panel["gridPos"]
        assert 0 <= box["x"] and box["x"] + box["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(box["x"], box["x"] + box["w"])
            for y in range(box["y"], box["y"] + box["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    for variable in data["templating"]["list"]:
        assert variable["datasource"]["uid"] == DATASOURCE, variable["name"]


def test_on_call_panels() -> None:
    """The panels to open first are there, each split by its label."""
    by_metric: dict[str, set[str]] = {}
    for query in queries():
        for name in query.metrics:
            by_metric.setdefault(name, set()).update(query.grouping)
    for name, label in ON_CALL.items():
        assert name in by_metric, f"no panel shows {name}"
        if label is not None:
            assert label in by_metric[name], f"{name} is not split by {label}"


def test_problems_are_found() -> None:
    """The check fails a dashboard that names a metric or a label the scrape
    lacks (so the live test below can fail)."""
    served: Served = {
        name: frozenset({label} if label else ()) for name, label in ON_CALL.items()
    }
    everything = {name for query in queries() for name in query.metrics}
    served.update({name: served.get(name, frozenset()) for name in everything})
    served["circus_watchdog_capture_failures_total"] = frozenset({"reason"})
    assert problems(served) == []
    del served["circus_watchdog_heartbeats_total"]
    served["circus_watchdog_kills_total"] = frozenset()
    found = problems(served)
    assert any("heartbeats_total is not served" in text for text in found), found
    assert any("no label watcher to group by" in text for text in found), found
    legend = Query("t", "sum by (instance) (rate(x_total[1m]))", {"watcher"})
    assert problems({"x_total": frozenset({"watcher"})}, [legend]) == [
        "t: sum by (instance) (rate(x_total[1m])): shows watcher, which the "
        "result has not"
    ]


def test_queries_match_a_live_scrape(
    circusd_factory: Callable[..., Circusd],
    standalone: Callable[..., Standalone],
) -> None:
    """Every query names only metrics and labels the running daemon serves."""
    udp = free_udp_port()
    circusd = circusd_factory(
        f"[watcher:app]\ncmd = {worker_cmd(udp)}\nnumprocesses = 2"
    )
    pids = wait_pids(circusd, {"app": 2})["app"]
    watchdog = standalone(circusd, "--port", str(udp), core=None)
    circusd.wait_for(lambda: sorted(watchdog.monitored()) == pids, timeout=10)
    body = http_get(watchdog.port, "/metrics")
    assert body is not None, watchdog.tail()
    served = served_labels(body.decode())
    assert "watcher" in served["circus_watchdog_kills_total"]  # a series per watcher
    assert problems(served) == []
