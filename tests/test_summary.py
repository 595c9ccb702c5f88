"""The engine's 10-second summary of ignored datagrams: a few heartbeats of
pids circusd just replaced are normal (INFO); mostly unknown, or malformed,
is a WARNING."""

from __future__ import annotations

import logging

import pytest

from circus_watchdog.engine import SUMMARY_INTERVAL, _Summary
from circus_watchdog.metrics import Metrics


def summarize(
    caplog: pytest.LogCaptureFixture, datagrams: int, unknown: int, malformed: int
) -> list[logging.LogRecord]:
    caplog.set_level(logging.INFO, "circus.watchdog")
    caplog.clear()
    metrics = Metrics()
    summary = _Summary(metrics, first=SUMMARY_INTERVAL)
    metrics.datagrams, metrics.unknown, metrics.malformed = (
        datagrams,
        unknown,
        malformed,
    )
    summary.maybe_log(SUMMARY_INTERVAL - 1)  # not yet
    assert caplog.records == []
    summary.maybe_log(SUMMARY_INTERVAL)
    return list(caplog.records)


def test_a_respawn_is_not_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    (record,) = summarize(caplog, datagrams=1000, unknown=3, malformed=0)
    assert record.levelno == logging.INFO
    assert "3 heartbeat(s) of unmonitored pids" in record.getMessage()


def test_mostly_unknown_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    (record,) = summarize(caplog, datagrams=100, unknown=40, malformed=0)
    assert record.levelno == logging.WARNING


def test_malformed_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    (record,) = summarize(caplog, datagrams=1000, unknown=0, malformed=1)
    assert record.levelno == logging.WARNING


def test_nothing_ignored_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    assert summarize(caplog, datagrams=1000, unknown=0, malformed=0) == []
