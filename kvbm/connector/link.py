"""Non-blocking requests to the leader: post now, collect the replies at a later step.

The scheduler-side planner posts a step's pins, store allocations and staging polls in one
burst and never waits for them on the engine's scheduler thread; the next step drains what
has arrived (``zmq.NOBLOCK``). A request with no reply after ``timeout_s`` is reported as
expired so its owner can give up (a load is recomputed, a store is dropped); a reply that
still comes later is delivered marked ``late``, so an op the leader granted meanwhile can be
released instead of leaking.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Sequence

import zmq

from kvbm.ipc.messages import ErrorReply, Message, ProtocolError, decode, encode

log = logging.getLogger(__name__)

# How long after expiring a request its reply is still delivered (marked late).
LATE_REPLY_S = 120.0


@dataclass(frozen=True)
class Reply:
    """What came back for one posted request: the reply, or ``error`` (error reply / expired).

    ``late``: the reply to a request already reported expired (its owner gave it up).
    """

    request_id: int
    message: Message | None
    error: str = ""
    late: bool = False


class AsyncLink:
    """A DEALER connection on which requests are posted and replies drained without waiting.

    Not thread-safe: the scheduler thread owns it.
    """

    _ids = itertools.count(1)

    def __init__(self, endpoint: str, *, timeout_s: float = 5.0, context: zmq.Context | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.connect(endpoint)
        self._posted: dict[int, float] = {}  # request id -> deadline
        # Frames the socket could not take yet (IMMEDIATE: the connection to the leader is still
        # being made, e.g. right after start-up); sent, in order, before anything newer.
        self._unsent: list[tuple[int, bytes]] = []  # (request id, frame)
        self._expired: dict[int, float] = {}  # request id -> until when a late reply is delivered

    def post(self, msgs: Sequence[Message]) -> list[int]:
        """Send every message now; their request ids, in order. One the socket cannot take yet
        (the connection to the leader is still being made) waits and goes out, in order, at a
        later ``post`` or ``drain``; still unsent at its deadline, it gets an error reply."""
        deadline = time.monotonic() + self.timeout_s
        ids = []
        for msg in msgs:
            rid = next(self._ids)
            self._unsent.append((rid, encode(msg, rid)))
            self._posted[rid] = deadline  # not sent by then: answered by an error reply in drain
            ids.append(rid)
        self._flush()
        return ids

    def _flush(self) -> None:
        """Send the frames waiting for the connection, oldest first, as far as it takes them."""
        while self._unsent:
            try:
                self._sock.send(self._unsent[0][1], zmq.NOBLOCK)
            except zmq.Again:
                return
            self._unsent.pop(0)

    def notify(self, msg: Message) -> None:
        """Send a message that gets no reply (dropped if the socket cannot take it now)."""
        try:
            self._sock.send(encode(msg, next(self._ids)), zmq.NOBLOCK)
        except zmq.Again:
            pass

    @property
    def outstanding(self) -> int:
        return len(self._posted)

    def drain(self, wait_s: float = 0.0) -> list[Reply]:
        """Replies that have arrived, plus an error Reply for every request past its deadline.

        ``wait_s`` > 0 blocks (in the socket poll) up to that long for the first reply when
        none is there yet: engines that run steps synchronously use it.
        """
        out: list[Reply] = []
        self._flush()
        if self._posted and wait_s > 0:
            self._sock.poll(int(wait_s * 1000) + 1)
        while self._posted or self._expired:
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                rid, msg = decode(frame)
            except ProtocolError as e:
                log.warning("dropping a malformed reply from the leader: %s", e)
                continue
            if self._posted.pop(rid, None) is None:
                if self._expired.pop(rid, None) is not None and not isinstance(msg, ErrorReply):
                    out.append(Reply(rid, msg, late=True))
                continue
            if isinstance(msg, ErrorReply):
                out.append(Reply(rid, None, f"{msg.code}: {msg.message}"))
            else:
                out.append(Reply(rid, msg))
        now = time.monotonic()
        for rid in [r for r, deadline in self._posted.items() if deadline <= now]:
            del self._posted[rid]
            self._unsent = [u for u in self._unsent if u[0] != rid]  # never sent late
            self._expired[rid] = now + LATE_REPLY_S
            out.append(Reply(rid, None, f"no reply from the leader at {self.endpoint} within {self.timeout_s:g} s"))
        for rid in [r for r, until in self._expired.items() if until <= now]:
            del self._expired[rid]
        return out

    def close(self) -> None:
        self._sock.close(0)
