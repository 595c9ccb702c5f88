"""Asyncio clients for circusd: commands over a DEALER, events over a SUB.

Commands (circus 0.19 ``controller.py``): circusd binds a ROUTER. The DEALER
sends one frame, ``{"command": C, "properties": {...}, "id": ID}`` in JSON, and
gets one frame back (the ROUTER strips our identity frame): a JSON object with
the same ``"id"``, ``"status"`` (``"ok"`` or ``"error"``), ``"time"``, the
command's own keys and, on error, ``"reason"``, ``"errno"`` and ``"tb"``. A cast
adds ``"msg_type": "cast"`` and gets no reply, not even for an error. circusd
runs one exclusive command at a time (``incr``, ``decr``, ``set``, ``start``,
``stop``, ``reload``, ``quit``, ``add``, ``rm`` and its own periodic sweep) and
refuses the others meanwhile with a reason that starts "arbiter is already
running"; ``list`` and ``kill`` are never refused.

Events (circus 0.19 ``watcher.py`` ``notify_event``, ``arbiter.py``): circusd
publishes two frames, ``b"watcher.<name>.<action>"`` and a JSON object. <name>
is the watcher name lower-cased with spaces turned into ``_`` (`topic_name`;
``list`` returns it lower-cased with its spaces) and may contain dots. Actions
and their data:

- ``spawn``: ``process_pid``, ``time`` (a process started);
- ``reap``: ``process_pid``, ``time``, ``exit_code``: a dead process was
  collected, by the arbiter's sweep every ``check_delay`` or when its watcher
  stops;
- ``kill``: ``process_pid``, ``time``: a signal was sent (stop signal, SIGKILL
  after ``graceful_timeout``, children too with ``stop_children``). A process
  circusd kills itself (the ``kill`` command, ``decr``, a lower
  ``numprocesses``, ``max_age``) is polled, and so collected, by the killer:
  it gets ``kill`` and, unless the sweep wins that race, no ``reap``;
- ``start``, ``stop``, ``reload``, ``updated`` (an option was ``set``),
  ``add`` and ``remove`` (watcher added or removed at run time): ``time``;
- ``hook_success``: ``name``, ``time``; ``hook_failure``: also ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from .tasks import end

__all__ = [
    "RESYNC_ACTIONS",
    "CallTimeout",
    "CircusError",
    "CommandClient",
    "Event",
    "EventSubscriber",
    "parse_topic",
    "topic_name",
]

logger = logging.getLogger(__name__)

#: Watcher-level actions after which the pid set must be re-read with ``list``:
#: they change a watcher's processes without a ``spawn``/``reap`` per pid
#: (``reload`` and ``updated`` drop processes with ``kill`` only) or add or
#: remove whole watchers.
RESYNC_ACTIONS: frozenset[str] = frozenset(
    {"add", "remove", "start", "stop", "reload", "updated"}
)

# zmq retries a lost connection after 100 ms, doubling up to this bound.
_RECONNECT_IVL_MAX_MS = 2000


class CircusError(Exception):
    """circusd answered a command with status "error"."""

    def __init__(self, command: str, reason: str) -> None:
        # One argument: TimeoutError (an OSError) would read two as errno, strerror.
        super().__init__(f"{command}: {reason}")
        self.command = command
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.command, self.reason)


class CallTimeout(CircusError, TimeoutError):
    """circusd did not answer a command within the timeout."""


def _new_socket(context: zmq.asyncio.Context, kind: int) -> zmq.asyncio.Socket:
    sock = context.socket(kind)
    sock.linger = 0
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_IVL_MAX_MS)
    return sock


class CommandClient:
    """Calls circusd commands over one DEALER socket that reconnects by itself.

    While circusd is down, commands are not queued for the next circusd: they
    fail with `CallTimeout`.  Should the task that reads the replies fail (a
    bug, or a socket error), the failure is logged and the client reconnects
    on a new socket, as after a lost connection: the calls in flight fail with
    `CircusError`, ``on_disconnect`` then ``on_connect`` are called.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float = 5.0,
        context: zmq.asyncio.Context | None = None,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._own_context = context is None
        self._context = context if context is not None else zmq.asyncio.Context()
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def start(self) -> None:
        """Connect and start dispatching replies and connection events."""
        self._open()

    def _open(self) -> None:
        sock = _new_socket(self._context, zmq.DEALER)
        # Queue only on a live connection: a command sent while circusd is down
        # must time out here, not run on the next circusd on stale state.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
        )
        sock.connect(self.endpoint)
        self._sock = sock
        self._tasks = [
            asyncio.create_task(self._read(sock)),
            asyncio.create_task(self._watch(self._monitor)),
        ]

    async def call(
        self, command: str, *, timeout: float | None = None, **props: Any
    ) -> dict[str, Any]:
        """Send a command and return circusd's reply (``timeout`` overrides the
        client's, for commands circusd answers late, like ``kill``)."""
        timeout = self.timeout if timeout is None else timeout
        mid = uuid.uuid4().hex
        msg = {"command": command, "properties": props, "id": mid}
        reply: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[mid] = reply
        try:
            res = await asyncio.wait_for(self._roundtrip(msg, reply), timeout)
        except asyncio.TimeoutError:
            raise CallTimeout(command, f"no reply in {timeout:g} s") from None
        finally:
            self._pending.pop(mid, None)
        if res.get("status") != "ok":
            raise CircusError(command, str(res.get("reason", "unknown")))
        return res

    async def cast(self, command: str, **props: Any) -> None:
        """Send a command that wants no reply; CallTimeout if it can't be sent."""
        msg = {"command": command, "msg_type": "cast", "properties": props}
        try:
            await asyncio.wait_for(self._send(msg), self.timeout)
        except asyncio.TimeoutError:
            raise CallTimeout(command, f"not sent in {self.timeout:g} s") from None

    async def close(self) -> None:
        """Stop the tasks and close the sockets."""
        tasks = self._tasks
        self._close_sockets()
        await end(tasks)
        if self._own_context and not self._context.closed:
            self._context.term()

    def _close_sockets(self) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._tasks = []
        if self._sock is not None:
            self._sock.disable_monitor()
            self._sock.close(linger=0)
            self._sock = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None

    def _reconnect(self) -> None:
        """The reader failed: start over on a new socket (logged by the caller)."""
        self._close_sockets()
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(CircusError("reply", "the connection was reset"))
        if self._on_disconnect is not None:
            try:
                self._on_disconnect()
            except Exception:
                logger.exception("connection callback failed")
        self._open()

    async def _send(self, msg: dict[str, Any]) -> None:
        if self._sock is None:
            raise RuntimeError("CommandClient is not started")
        await self._sock.send(orjson.dumps(msg))

    async def _roundtrip(
        self, msg: dict[str, Any], reply: asyncio.Future[dict[str, Any]]
    ) -> dict[str, Any]:
        await self._send(msg)
        return await reply

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        try:
            await self._dispatch(sock)
        except Exception:
            logger.exception("reading circusd's replies failed: reconnecting")
            self._reconnect()

    async def _dispatch(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                res = orjson.loads(frames[-1])
                reply = self._pending.get(res["id"])
            except (orjson.JSONDecodeError, TypeError, KeyError):
                logger.debug("dropping malformed reply %r", frames)
                continue
            # No future: its call timed out, so the late reply goes nowhere.
            if reply is not None and not reply.done():
                reply.set_result(res)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())["event"]
            if event == zmq.EVENT_CONNECTED:
                callback = self._on_connect
            elif event == zmq.EVENT_DISCONNECTED:
                callback = self._on_disconnect
            else:
                continue
            if callback is not None:
                try:
                    callback()
                except Exception:
                    logger.exception("connection callback failed")


class Event(NamedTuple):
    """One watcher event published by circusd."""

    watcher: str
    action: str
    data: dict[str, Any]


def topic_name(watcher: str) -> str:
    """The name circusd gives ``watcher`` in event topics."""
    return watcher.lower().replace(" ", "_")


def parse_topic(topic: bytes) -> tuple[str, str] | None:
    """Split ``watcher.<name>.<action>`` into (name, action), else None."""
    try:
        text = topic.decode()
    except UnicodeDecodeError:
        return None
    prefix, _, rest = text.partition(".")
    # The name may hold dots; the action never does.
    name, _, action = rest.rpartition(".")
    if prefix != "watcher" or not name or not action:
        return None
    return name, action


class EventSubscriber:
    """Receives circusd's ``watcher.*`` events over a SUB socket."""

    def __init__(
        self, pubsub_endpoint: str, *, context: zmq.asyncio.Context | None = None
    ) -> None:
        self.endpoint = pubsub_endpoint
        self._own_context = context is None
        self._context = context if context is not None else zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None

    async def start(self) -> None:
        """Connect and subscribe to watcher events."""
        sock = _new_socket(self._context, zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"watcher.")
        sock.connect(self.endpoint)
        self._sock = sock

    async def recv(self) -> Event:
        """Return the next well-formed event, skipping malformed messages."""
        if self._sock is None:
            raise RuntimeError("EventSubscriber is not started")
        while True:
            frames = await self._sock.recv_multipart()
            parsed = parse_topic(frames[0]) if len(frames) == 2 else None
            data: object = None
            if parsed is not None:
                with contextlib.suppress(orjson.JSONDecodeError):
                    data = orjson.loads(frames[1])
            if parsed is None or not isinstance(data, dict):
                logger.debug("skipping malformed event %r", frames)
                continue
            return Event(parsed[0], parsed[1], data)

    async def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_context and not self._context.closed:
            self._context.term()
