"""The default-format parser: a corpus and a property against the original regex."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# The original plugin's default msg_regex, applied as it does: data.decode().
ORIGINAL = re.compile(r"^(?P<pid>.*);(?P<timestamp>.*)$")


def original_pid(data: bytes) -> int | None:
    """What the original would match, narrowed to pids that can name a process."""
    if not 0 < len(data) <= 1024:
        return None
    try:
        match = ORIGINAL.match(data.decode())
    except UnicodeDecodeError:
        return None
    if match is None:
        return None
    pid = match.group("pid")
    if not (pid.isascii() and pid.isdigit()) or pid.startswith("0"):
        return None
    return int(pid) if int(pid) <= 2**31 - 1 else None


CORPUS: list[tuple[bytes, int | None]] = [
    (b"12345;1764310000.123", 12345),
    (b"1;0", 1),
    (b"2147483647;1", 2**31 - 1),
    (b"12345;1764310000.123\n", 12345),
    (b"12345;1764310000.123\r\n", 12345),  # `.` matches \r, `$` the final \n
    (b"12345;", 12345),  # the original accepts an empty timestamp
    (b"12345;\n", 12345),
    (b"12;34;56", None),  # greedy: pid would be "12;34"
    (b"", None),
    (b"\n", None),
    (b";", None),
    (b";123", None),
    (b"12345", None),  # no `;`
    (b"12345\n", None),
    (b"0;1", None),
    (b"00012;1", None),
    (b"+12;1", None),
    (b"-12;1", None),
    (b" 12;1", None),
    (b"12 ;1", None),
    (b"2147483648;1", None),  # 2**31
    (b"99999999999999999999;1", None),  # 20 digits
    (b"12;1\n\n", None),
    (b"12\n;1", None),
    (b"12;1\nx", None),
    (b"12;caf\xc3\xa9", 12),  # valid UTF-8 after the pid
    (b"12;\xff", None),  # not UTF-8: the original's decode() raises
    (b"12;\xed\xa0\x80", None),  # a UTF-16 surrogate is not UTF-8
    (b"12;\xc0\x80", None),  # overlong
    (b"12;\xf4\x90\x80\x80", None),  # past U+10FFFF
    (b"12;\xe2\x82", None),  # truncated sequence
    (b"\xd9\xa1\xd9\xa2;1", None),  # Arabic-Indic digits are not ASCII digits
    (b"12;" + b"x" * 1021, 12),  # exactly 1024 bytes
    (b"12;" + b"x" * 1022, None),  # 1025 bytes
    (b"12;\x00", 12),
]


@pytest.mark.parametrize(("data", "expected"), CORPUS, ids=repr)
def test_corpus(
    parse_heartbeat: Callable[[bytes], int | None],
    data: bytes,
    expected: int | None,
) -> None:
    assert parse_heartbeat(data) == expected
    assert original_pid(data) == expected  # the corpus itself agrees with the oracle


def test_accepts_bytearray_and_memoryview(
    parse_heartbeat: Callable[[bytes], int | None],
) -> None:
    assert parse_heartbeat(bytearray(b"7;1")) == 7
    assert parse_heartbeat(memoryview(b"7;1")) == 7  # type: ignore[arg-type]


heartbeat_like = st.builds(
    lambda pid, sep, ts, end: pid + sep + ts + end,
    st.one_of(
        st.integers(0, 2**32).map(lambda n: b"%d" % n),
        st.sampled_from([b"", b"0", b"+1", b"-1", b" 1", b"01", b"1 "]),
        st.binary(max_size=12),
    ),
    st.sampled_from([b";", b";;", b"", b":", b"\n;"]),
    st.one_of(st.binary(max_size=40), st.text(max_size=20).map(str.encode)),
    st.sampled_from([b"", b"\n", b"\r\n", b"\n\n"]),
)


@given(data=st.one_of(heartbeat_like, st.binary(max_size=1100)))
def test_matches_original_regex(
    parse_heartbeat: Callable[[bytes], int | None], data: bytes
) -> None:
    assert parse_heartbeat(data) == original_pid(data)


@pytest.mark.c_extension
@given(data=st.one_of(heartbeat_like, st.binary(max_size=1100)))
def test_twins_agree(data: bytes) -> None:
    from circus_watchdog import _core_c, _core_py

    assert _core_c.parse_heartbeat(data) == _core_py.parse_heartbeat(data)


TIMESTAMPS: list[tuple[bytes, float | None]] = [
    (b"12;1764310000.123", 1764310000.123),
    (b"12;1764310000", 1764310000.0),
    (b"12;1764310000.", 1764310000.0),
    (b"12;.5", 0.5),
    (b"12;17\n", 17.0),
    (b"12;17\r\n", 17.0),
    (b"12;", None),
    (b"12;.", None),
    (b"12;abc", None),
    (b"12;1e9", None),
    (b"12;-5", None),
    (b"12; 5", None),
    (b"12;1_000", None),
    (b"12;inf", None),
    (b"12;1.2.3", None),
    (b"12;" + b"1" * 33, None),
    (b"0;5", None),  # not a heartbeat at all
]


@pytest.mark.parametrize(("data", "expected"), TIMESTAMPS, ids=repr)
def test_heartbeat_timestamp(core: Any, data: bytes, expected: float | None) -> None:
    assert core.heartbeat_timestamp(data) == expected


@pytest.mark.c_extension
@given(data=st.one_of(heartbeat_like, st.binary(max_size=64)))
def test_timestamp_twins_agree(data: bytes) -> None:
    from circus_watchdog import _core_c, _core_py

    assert _core_c.heartbeat_timestamp(data) == _core_py.heartbeat_timestamp(data)
