"""loadgen: a UDP heartbeat flood generator for circus-watchdog.

Installed as ``circus_watchdog.loadgen`` from the repository's ``loadgen/``
folder. It sends ``PID;TIMESTAMP`` datagrams (the watchdog's heartbeat format)
with its own ``sendmmsg`` sender (``_send_c.pyx``, a pure twin in
``_send_py.py``, chosen by ``_send.py`` as the core is), paced to a rate, from
one or more worker processes, and reports what it sent.  It only sends to
loopback (127.0.0.0/8, ::1) unless ``--allow-remote`` is given, and every run
is bounded by ``--count`` and/or ``--duration`` (10 s when neither is given).

Modules: ``options`` (flags and checks), ``flood`` (payloads, the paced send
loop, a worker process), ``workers`` (running them), ``report`` and ``cli``.

Usage (``python -m circus_watchdog.loadgen`` is the same command)::

    # Flood a watchdog listening on 127.0.0.1:1664 at 100k datagrams/s for 10 s,
    # heartbeats of 1000 synthetic pids (1000..1999):
    circus-watchdog-loadgen --rate 100000 --duration 10

    # Heartbeats of the real processes of the watchers "web.*" of a circusd:
    circus-watchdog-loadgen --endpoint tcp://127.0.0.1:5555 --watchers 'web.*' \\
        --rate 1000 --duration 60

    # 10% malformed datagrams, 20% heartbeats of unknown pids, exactly 1e6
    # datagrams from 2 processes, as fast as possible, JSON report:
    circus-watchdog-loadgen --mix malformed=0.1,unknown=0.2 --count 1000000 \\
        --workers 2 --rate max --json

See ``docs/loadgen.md`` for every option and the report format.
"""

__all__: list[str] = []
