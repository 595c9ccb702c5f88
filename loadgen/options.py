"""loadgen's options: the argparse parser, the checks of each value and the
pids to send for (synthetic, or read from a circusd with ``--endpoint``)."""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
import socket
from typing import Any

from circus_watchdog.client import parse_address
from circus_watchdog.pids import PID_MAX

DEFAULT_TARGET = "127.0.0.1:1664"
DEFAULT_DURATION = 10.0  # seconds, when neither --count nor --duration is given
SAFETY_DURATION = 3600.0  # seconds, the time bound of a run given only --count
DEFAULT_SNDBUF = 4 * 1024 * 1024  # bytes
MAX_WORKERS = 256


class UsageError(Exception):
    """A bad option value: exit status 2, the message names the option."""


class RunError(Exception):
    """The run could not start or a worker failed: exit status 1."""


# -- option values ----------------------------------------------------------


def parse_target(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[IPV6]:PORT`` into host and port."""
    try:
        return parse_address(text, "--target")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def is_loopback(ip: str) -> bool:
    """Whether ``ip`` (numeric, IPv4 or IPv6) is a loopback address."""
    addr = ipaddress.ip_address(ip.partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def resolve_target(text: str, allow_remote: bool) -> tuple[int, tuple[Any, ...], str]:
    """Resolve ``--target`` to (family, sockaddr, display); refuse non-loopback."""
    host, port = parse_target(text)
    try:
        infos = socket.getaddrinfo(
            host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM, socket.IPPROTO_UDP
        )
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"--target {text!r}: cannot resolve {host!r}: {exc}") from None
    infos = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
    if not infos:
        raise UsageError(f"--target {text!r}: {host!r} has no IPv4 or IPv6 address")
    family, _, _, _, sockaddr = infos[0]
    ip = str(sockaddr[0])
    if not allow_remote and not is_loopback(ip):
        raise UsageError(
            f"--target {text!r}: {ip} is not a loopback address; loadgen only "
            "floods 127.0.0.0/8 and ::1 unless --allow-remote is given"
        )
    display = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
    return family, tuple(sockaddr), display


def parse_rate(text: str) -> float | None:
    """``max`` (None) or a positive number of datagrams per second."""
    if text.strip().lower() == "max":
        return None
    try:
        rate = float(text)
    except ValueError:
        raise UsageError(f"--rate {text!r}: expected datagrams/s or 'max'") from None
    if not (math.isfinite(rate) and rate > 0):
        raise UsageError(f"--rate {text!r}: must be > 0 datagrams/s")
    return rate


def parse_mix(text: str) -> tuple[float, float]:
    """``malformed=F,unknown=F`` into the two fractions (each 0..1, sum <= 1)."""
    shares = {"malformed": 0.0, "unknown": 0.0}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in shares:
            raise UsageError(
                f"--mix {text!r}: expected malformed=F,unknown=F, got {item!r}"
            )
        try:
            share = float(value)
        except ValueError:
            raise UsageError(
                f"--mix {text!r}: {key} {value!r} is not a number"
            ) from None
        if not (math.isfinite(share) and 0.0 <= share <= 1.0):
            raise UsageError(f"--mix {text!r}: {key} must be a fraction in 0..1")
        shares[key] = share
    if shares["malformed"] + shares["unknown"] > 1.0 + 1e-9:
        raise UsageError(f"--mix {text!r}: malformed + unknown must be <= 1")
    return shares["malformed"], shares["unknown"]


def fetch_pids(endpoint: str, watchers: str, timeout: float) -> tuple[int, ...]:
    """Pids of the watchers matching ``watchers`` (re.match) in a running circusd."""
    try:
        regex = re.compile(watchers)
    except re.error as exc:
        raise UsageError(f"--watchers {watchers!r}: bad regex: {exc}") from None
    # circus pulls in zmq and tornado: only --endpoint pays for them.
    from circus.client import CircusClient, make_message  # noqa: PLC0415
    from circus.exc import CallError  # noqa: PLC0415

    client = CircusClient(endpoint=endpoint, timeout=timeout)
    try:

        def call(command: str, **props: Any) -> dict[str, Any]:
            what = " ".join([command, *(f"{k}={v}" for k, v in props.items())])
            try:
                answer = client.call(make_message(command, **props))
            except CallError as exc:
                raise RunError(
                    f"--endpoint {endpoint}: `{what}` failed within {timeout:g} s: "
                    f"{exc}"
                ) from None
            if not isinstance(answer, dict) or answer.get("status") != "ok":
                raise RunError(f"--endpoint {endpoint}: `{what}` answered {answer!r}")
            return answer

        names = [str(w) for w in call("list").get("watchers", [])]
        pids: list[int] = []
        for name in names:
            if regex.match(name):
                pids.extend(int(p) for p in call("list", name=name).get("pids", []))
    finally:
        client.stop()
    found = tuple(sorted({p for p in pids if 1 <= p <= PID_MAX}))
    if not found:
        raise RunError(
            f"--endpoint {endpoint}: no pid in the watchers matching {watchers!r} "
            f"(watchers: {', '.join(names) or 'none'})"
        )
    return found


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of circus-watchdog-loadgen."""
    p = argparse.ArgumentParser(
        prog="circus-watchdog-loadgen",
        description="Flood a circus-watchdog with UDP heartbeats (PID;TIMESTAMP), "
        "from loopback to loopback only.",
        epilog="Example: circus-watchdog-loadgen --rate 100000 --duration 10 "
        "(see docs/loadgen.md).",
    )
    p.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        metavar="HOST:PORT",
        help="where to send: IPv4 HOST:PORT or [IPV6]:PORT, a loopback address "
        f"unless --allow-remote (default: {DEFAULT_TARGET})",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --target that is not a loopback address (flag, no unit)",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument(
        "--pids",
        type=positive_int,
        default=None,
        metavar="N",
        help="number of synthetic pids to send heartbeats for, PID-BASE.."
        "PID-BASE+N-1 (pids; default: 1000)",
    )
    who.add_argument(
        "--endpoint",
        metavar="URL",
        help="circusd controller endpoint (a tcp:// URL) to read the pids of the "
        "watchers matching --watchers from, instead of --pids",
    )
    p.add_argument(
        "--pid-base",
        type=positive_int,
        default=1000,
        metavar="PID",
        help="first synthetic pid (a pid; default: 1000)",
    )
    p.add_argument(
        "--watchers",
        default=".*",
        metavar="REGEX",
        help="with --endpoint: watcher names to take pids from, matched from the "
        "start like watchers_regex (a regex; default: .*)",
    )
    p.add_argument(
        "--endpoint-timeout",
        type=positive_float,
        default=5.0,
        metavar="S",
        help="with --endpoint: how long to wait for each circusd answer "
        "(seconds; default: 5)",
    )
    p.add_argument(
        "--rate",
        default="max",
        metavar="PPS",
        help="datagrams per second in total across workers, or 'max' for as "
        "fast as the socket takes them (datagrams/s; default: max)",
    )
    p.add_argument(
        "--duration",
        type=positive_float,
        default=None,
        metavar="S",
        help=f"stop after S seconds (seconds; default: {DEFAULT_DURATION:g} s when "
        f"--count is not given, else a {SAFETY_DURATION:g} s safety bound)",
    )
    p.add_argument(
        "--count",
        type=positive_int,
        default=None,
        metavar="N",
        help="stop after N datagrams in total, split exactly across workers "
        "(datagrams; default: no count bound, see --duration)",
    )
    p.add_argument(
        "--mix",
        default="",
        metavar="malformed=F,unknown=F",
        help="fractions of datagrams that are malformed and that are heartbeats "
        "of unknown pids, the rest valid heartbeats (fractions 0..1; default: "
        "all valid)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help=f"sender processes, each with its own socket and a 1/N share of "
        f"--rate and --count (processes, 1..{MAX_WORKERS}; default: 1, in-process)",
    )
    p.add_argument(
        "--sndbuf",
        type=positive_int,
        default=DEFAULT_SNDBUF,
        metavar="BYTES",
        help="SO_SNDBUF asked for each socket, capped by net.core.wmem_max "
        f"(bytes; default: {DEFAULT_SNDBUF})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="INT",
        help="seed of the random unknown pids (an integer; default: 0)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (sent, elapsed in seconds, rate in "
        "datagrams/s, workers, mix, target) instead of the text report (flag)",
    )
    return p
