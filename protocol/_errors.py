"""The protocol's error tree and its stable wire codes.

- ``ProtocolError``: the bytes or the envelope are wrong.
    - ``FrameTooLarge``: a header announced more than the peer accepts.
    - ``FrameCorrupt``: the body is not one msgpack map.
- ``AgentError``: the agent answered a request with ``ok: false``. Carries ``code``
  (one of ``ERROR_CODES``), ``message`` and ``details``.
    - ``BadRequest``: ``bad_request``; raised by validation, names the field.

Tracebacks never cross the wire: only a code, a message and details.
"""

from __future__ import annotations

ERROR_CODES = frozenset(
    {"bad_request", "not_found", "forbidden", "conflict", "unavailable", "too_large", "internal"}
)


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame or envelope."""


class FrameTooLarge(ProtocolError):
    """A frame header announced more bytes than the maximum frame size."""


class FrameCorrupt(ProtocolError):
    """A frame body that does not decode to exactly one msgpack map."""


class AgentError(Exception):
    """An error reply from the agent (or one the agent is about to send)."""

    code = "internal"

    def __init__(self, message: str, *, code: str | None = None, details: dict | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if self.code not in ERROR_CODES:
            self.code = "internal"
        self.message = message
        self.details = details or {}

    def to_wire(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return error

    @classmethod
    def from_wire(cls, error: dict) -> "AgentError":
        code = error.get("code", "internal")
        subclass = _BY_CODE.get(code, AgentError)
        exc = subclass(str(error.get("message", "")), details=error.get("details") or {})
        exc.code = code if code in ERROR_CODES else "internal"
        return exc

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadRequest(AgentError):
    code = "bad_request"


class NotFound(AgentError):
    code = "not_found"


class Forbidden(AgentError):
    code = "forbidden"


class Conflict(AgentError):
    code = "conflict"


class Unavailable(AgentError):
    code = "unavailable"


class TooLarge(AgentError):
    code = "too_large"


_BY_CODE = {c.code: c for c in (BadRequest, NotFound, Forbidden, Conflict, Unavailable, TooLarge)}
