"""logs.configure: log_output and log_level, standalone and as a plugin (fast)."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from circus_watchdog import logs, procfs
from circus_watchdog.config import Config, ConfigError

logger = logging.getLogger("circus.watchdog")


@pytest.fixture(autouse=True)
def root_logger() -> Iterator[logging.Logger]:
    """configure() replaces the root logger's handlers: put pytest's back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers, root.level = handlers, level


def config(**options: str) -> Config:
    return Config.from_options(options)


def test_dash_is_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    """``-`` is stdout, as documented (circus's own helper writes to stderr)."""
    logs.configure(config(log_output="-"))
    logger.info("to stdout")
    out, err = capsys.readouterr()
    assert "circus.watchdog" in out
    assert "[INFO] to stdout" in out
    assert "to stdout" not in err


def test_file_is_created_then_appended(tmp_path: Path) -> None:
    path = tmp_path / "wd.log"
    logs.configure(config(log_output=str(path), log_level="warning"))
    logger.info("not at warning")
    logger.warning("first")
    logs.configure(config(log_output=str(path)))
    logger.info("second")
    lines = path.read_text().splitlines()
    assert [line.rsplit("] ", 1)[1] for line in lines] == ["first", "second"]


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("/nonexistent/d/wd.log", "No such file or directory"),
        ("{tmp}", "Is a directory"),
    ],
)
def test_unwritable_file_is_one_line_naming_log_output(
    tmp_path: Path, output: str, reason: str
) -> None:
    output = output.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as info:
        logs.configure(config(log_output=output))
    assert str(info.value) == (
        "invalid log_output (--log-output): expected a file that can be created "
        f"or appended to, got {output!r} ({reason})"
    )


def test_unreachable_syslog_socket_names_log_output(tmp_path: Path) -> None:
    output = f"syslog://{tmp_path}/no-such-socket?daemon"
    with pytest.raises(ConfigError, match=r"^invalid log_output \(--log-output\): "):
        logs.configure(config(log_output=output))


def test_syslog_url_over_udp() -> None:
    """``syslog://host:port?facility``, as circus takes it: a real datagram."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        port = server.getsockname()[1]
        logs.configure(config(log_output=f"syslog://127.0.0.1:{port}?daemon"))
        logger.info("over syslog")
        data = server.recv(4096)
    # <daemon * 8 + info>
    assert data.startswith(b"<30>")
    assert b"[INFO] over syslog" in data


CWD = os.getcwd()


@pytest.mark.parametrize(
    ("cmdline", "plugin_argv", "expected"),
    [
        # circusd's flag, in the forms argparse takes (abbreviations included).
        (["py", "-m", "circus.circusd", "--log-output", "/a", "c.ini"], [], "/a"),
        (["py", "/venv/bin/circusd", "c.ini", "--log-output=/b.log"], [], "/b.log"),
        (["/venv/bin/circusd", "--daemon", "--log-o", "/c.log", "c.ini"], [], "/c.log"),
        # circusd's flag wins over [circus] logoutput (the plugin's --log-output).
        (["circusd", "--log-output", "/d.log"], ["--log-output", "/e.log"], "/d.log"),
        (["circusd", "c.ini"], ["--log-output", "/e.log", "x.WatchDog"], "/e.log"),
        (["circusd", "c.ini"], ["--log-output", "syslog://h?user"], "syslog://h?user"),
        # Neither: circusd logs to its stderr.
        (["circusd", "c.ini"], ["--log-level", "info", "x.WatchDog"], "-"),
        (None, [], "-"),
        (["circusd", "--log-output"], [], "-"),  # what circusd itself refuses
        # A relative path is circusd's working directory's (here: ours).
        (["circusd", "--log-output", "rel.log"], [], os.path.join(CWD, "rel.log")),
    ],
)
def test_circusd_log_output(
    cmdline: list[str] | None, plugin_argv: list[str], expected: str
) -> None:
    assert logs.circusd_log_output(os.getpid(), plugin_argv, cmdline) == expected


def test_circusd_ini_logoutput(tmp_path: Path) -> None:
    """``[circus] logoutput`` read from circusd's own ini (a plugin restarted by
    ``reloadconfig`` is not given it); circusd's flag still wins."""
    ini = tmp_path / "circus.ini"
    ini.write_text("[circus]\nlogoutput = /from/ini.log\n")
    argv = ["--log-output", "/from/plugin/argv.log"]
    got = logs.circusd_log_output(os.getpid(), [], ["circusd", str(ini)])
    assert got == "/from/ini.log"
    got = logs.circusd_log_output(os.getpid(), argv, ["circusd", str(ini)])
    assert got == "/from/ini.log"
    cmdline = ["circusd", "--log-output", "/flag.log", str(ini)]
    assert logs.circusd_log_output(os.getpid(), argv, cmdline) == "/flag.log"


def test_plugin_log_output_file_gets_all_and_circusd_log_the_trouble(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a plugin: log_output receives the log; circusd's log (here the file
    its --log-output names, found on the parent's command line) gets warnings
    and errors only. Without log_output, circusd's log gets it all."""
    own, circusd = tmp_path / "own.log", tmp_path / "circusd.log"
    cmdline = ["circusd", "--log-output", str(circusd), "c.ini"]
    monkeypatch.setattr(procfs, "cmdline", lambda pid: cmdline)
    monkeypatch.setattr(sys, "argv", ["-c", "--log-level", "info"])
    logs.configure(config(log_output=str(own)), plugin=True)
    logger.info("routine")
    logger.error("trouble")
    assert "routine" in own.read_text()
    assert "trouble" in own.read_text()
    assert "routine" not in circusd.read_text()
    assert "trouble" in circusd.read_text()
    logs.configure(config(), plugin=True)
    logger.info("visible by default")
    assert "visible by default" in circusd.read_text()
    assert "visible by default" not in own.read_text()


def test_plugin_default_writes_to_parent_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither flag nor logoutput: the line goes to circusd's stderr, reopened
    through /proc (here: this process plays circusd, its stderr a file)."""
    if not os.path.exists(f"/proc/{os.getpid()}/fd/2"):
        pytest.skip("no /proc: the plugin cannot reach circusd's stderr")
    err = tmp_path / "stderr"
    saved = os.dup(2)
    try:
        with open(err, "ab") as f:
            os.dup2(f.fileno(), 2)
        monkeypatch.setattr(os, "getppid", os.getpid)
        monkeypatch.setattr(procfs, "cmdline", lambda pid: ["circusd", "c.ini"])
        monkeypatch.setattr(sys, "argv", ["-c"])
        logs.configure_plugin_default()
        logger.error("invalid max_count (--max-count): ... got '0'")
        logging.getLogger().handlers[0].flush()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert "[ERROR] invalid max_count (--max-count): ... got '0'" in err.read_text()


def test_plugin_default_when_circusd_stderr_is_a_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """circusd's stderr a socket (systemd's journal): it cannot be reopened
    (ENXIO), so the line goes to the local syslog socket (here a stand-in)."""
    if not os.path.exists(f"/proc/{os.getpid()}/fd/2"):
        pytest.skip("no /proc")
    dev_log = str(tmp_path / "log")
    journal, other_end = socket.socketpair()
    saved = os.dup(2)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog, journal, other_end:
        syslog.bind(dev_log)
        syslog.settimeout(5)
        monkeypatch.setattr(logs, "DEV_LOG", dev_log)
        monkeypatch.setattr(os, "getppid", os.getpid)
        monkeypatch.setattr(procfs, "cmdline", lambda pid: ["circusd", "c.ini"])
        monkeypatch.setattr(sys, "argv", ["-c"])
        try:
            os.dup2(journal.fileno(), 2)
            logs.configure_plugin_default()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        logger.error("cannot start")
        data = syslog.recv(4096)
    assert data.startswith(b"<11>")  # user * 8 + error
    assert b"[ERROR] cannot start" in data


def test_plugin_log_output_same_as_circusd_log_is_not_doubled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "circus.log"
    monkeypatch.setattr(procfs, "cmdline", lambda pid: ["circusd", "c.ini"])
    monkeypatch.setattr(sys, "argv", ["-c", "--log-output", str(log)])
    logs.configure(config(log_output=str(log)), plugin=True)
    logger.error("once")
    assert log.read_text().count("once") == 1
