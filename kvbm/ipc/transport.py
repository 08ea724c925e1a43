"""ZeroMQ endpoints and the request/reply client used to talk to the leader.

The leader binds one ROUTER socket. Ranks and scheduler-side clients connect DEALER
sockets; every request carries an id that its reply echoes, so a late reply from a
previous (timed-out) request is recognised and dropped.

Endpoints default to ``ipc://`` sockets in a private 0700 directory. A ``tcp://`` endpoint
on an address other than loopback is refused unless explicitly allowed.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
import time
from collections.abc import Sequence
from typing import TypeVar

import zmq

from kvbm.config import is_loopback_endpoint
from kvbm.ipc.names import safe_name
from kvbm.ipc.messages import ErrorReply, Message, ProtocolError, decode, encode

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class LeaderUnavailable(RuntimeError):
    """The leader did not answer in time (dead, not started, or hung)."""


class Interrupted(Exception):
    """A call given up because its wake-up descriptor became readable; its late reply is dropped."""


class RemoteError(RuntimeError):
    """The leader answered with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def ensure_private_dir(path: str) -> str:
    """Create ``path`` as a 0700 directory of ours, or verify an existing one is."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(f"{path} is not a directory owned by uid {os.getuid()}; refusing to use it")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def instance_endpoint(run_dir: str, instance: str) -> str:
    """The default leader address of ``instance``: an ipc socket in the private run dir."""
    return f"ipc://{os.path.join(run_dir, safe_name(instance))}.sock"


def check_bind_endpoint(endpoint: str, allow_non_loopback: bool) -> None:
    """Refuse to bind a non-loopback tcp address unless explicitly allowed; log when allowed."""
    if is_loopback_endpoint(endpoint):
        return
    if not allow_non_loopback:
        raise PermissionError(
            f"refusing to bind {endpoint}: not a loopback address; set DYN_KVBM_ALLOW_NON_LOOPBACK=1 to allow it"
        )
    log.warning("binding %s on a non-loopback address (DYN_KVBM_ALLOW_NON_LOOPBACK is set)", endpoint)


class RpcClient:
    """A DEALER connection to the leader with per-call timeouts. Not thread-safe."""

    _ids = itertools.count(1)

    def __init__(self, endpoint: str, *, context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Do not queue requests for a peer that is gone; a call then times out quickly.
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.connect(endpoint)
        # One poller for the socket's life: Socket.poll builds a new one every call.
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._wake_pollers: dict[int, zmq.Poller] = {}  # per wake-up descriptor of call()

    def call(self, msg: Message, timeout_s: float, expect: type[M], *, wake_fd: int | None = None) -> M:
        """Send ``msg`` and wait up to ``timeout_s`` for its reply of type ``expect``.

        The one-request path of :meth:`call_many` (the scheduler's lookups take it): no
        per-call lists or maps. Raises RemoteError for an error reply, LeaderUnavailable on timeout,
        and Interrupted when ``wake_fd`` (a descriptor; the caller drains it) becomes readable first.
        """
        request_id = next(self._ids)
        deadline = time.monotonic() + timeout_s
        self._send(encode(msg, request_id), deadline)
        poller = self._poller if wake_fd is None else self._wake_poller(wake_fd)
        while True:
            rid, reply = self._recv(deadline, timeout_s, poller)
            if rid == request_id:
                break  # else a late reply to an earlier call that timed out (or a malformed one)
        out = _typed(reply, expect)
        if isinstance(out, RemoteError):
            raise out
        return out

    def call_many(self, msgs: Sequence[Message], timeout_s: float, expect: type[M]) -> list[M | RemoteError]:
        """Send every request at once, then collect the replies: one round trip for all.

        Returns the replies in request order; an error reply becomes a RemoteError in its
        place. Raises LeaderUnavailable if any reply is missing after ``timeout_s``.
        """
        ids = [next(self._ids) for _ in msgs]
        deadline = time.monotonic() + timeout_s
        for request_id, msg in zip(ids, msgs):
            self._send(encode(msg, request_id), deadline)
        pending = {request_id: i for i, request_id in enumerate(ids)}
        out: list[M | RemoteError | None] = [None] * len(ids)
        while pending:
            rid, reply = self._recv(deadline, timeout_s)
            i = pending.pop(rid, None)
            if i is not None:  # else a late reply to an earlier call that timed out
                out[i] = _typed(reply, expect)
        return [r for r in out if r is not None]

    def _send(self, frame: bytes, deadline: float) -> None:
        while True:  # the connection may still be coming up (or the leader is gone)
            try:
                self._sock.send(frame, zmq.NOBLOCK)
                return
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise LeaderUnavailable(f"leader at {self.endpoint} is not connected") from None
                time.sleep(0.005)

    def _wake_poller(self, wake_fd: int) -> zmq.Poller:
        poller = self._wake_pollers.get(wake_fd)
        if poller is None:
            poller = self._wake_pollers[wake_fd] = zmq.Poller()
            poller.register(self._sock, zmq.POLLIN)
            poller.register(wake_fd, zmq.POLLIN)
        return poller

    def _recv(self, deadline: float, timeout_s: float, poller: zmq.Poller | None = None) -> tuple[int, Message | None]:
        """The next reply as (request id, message); (-1, None) for a malformed one (logged)."""
        poller = poller or self._poller
        remaining = deadline - time.monotonic()
        ready = poller.poll(int(remaining * 1000) + 1) if remaining > 0 else []
        if not ready:
            raise LeaderUnavailable(f"no reply from the leader at {self.endpoint} within {timeout_s:g} s")
        if poller is not self._poller and not any(s is self._sock for s, _ in ready):
            raise Interrupted("woken while waiting for a reply")
        try:
            return decode(self._sock.recv())
        except ProtocolError as e:
            log.warning("dropping a malformed reply from the leader: %s", e)
            return -1, None

    def send(self, msg: Message) -> None:
        """Fire-and-forget (heartbeats, acks); dropped if the leader is not connected."""
        try:
            self._sock.send(encode(msg, 0), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self._sock.close(0)


def _typed(reply: Message | None, expect: type[M]) -> M | RemoteError:
    """A reply as the expected type, or the RemoteError it stands for."""
    if isinstance(reply, expect):
        return reply
    if isinstance(reply, ErrorReply):
        return RemoteError(reply.code, reply.message)
    return RemoteError("protocol", f"expected {expect.TAG}, got {reply.TAG if reply is not None else 'nothing'}")
