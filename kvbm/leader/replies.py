"""What the leader's handlers produce: answers addressed to peers, and refusals."""

from __future__ import annotations

from dataclasses import dataclass

from kvbm.ipc import messages as m


class RequestRejected(Exception):
    """A well-formed request that cannot be served; becomes an ErrorReply with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Outbound:
    """A message for a peer: ``request_id`` is the request it answers."""

    peer: bytes
    request_id: int
    message: m.Message
