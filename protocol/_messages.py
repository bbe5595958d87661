"""Envelopes: requests, replies and stream items, and the parsing of a request.

Message flow on one connection::

    client                                   agent
      {"id": 0, "op": "hello", "args": {"protocol": 1}}  ->
                          <-  {"id": 0, "ok": true, "result": {"agent_version", "protocol", "uid", "user"}}
      {"id": 1, "op": "submit", "args": {"spec": {...}}} ->
                          <-  {"id": 1, "ok": true, "result": {run}}
      {"id": 2, "op": "logs", "args": {"run_id": ..., "follow": true}} ->
                          <-  {"id": 2, "item": {"offset": 0, "data": b"..."}}   (any number of these)
                          <-  {"id": 2, "end": true}
                          <-  or {"id": 2, "ok": false, "error": {...}} ending the stream early

Several requests may be in flight on one connection; replies carry the request's id.
"""

from __future__ import annotations

from ._errors import AgentError, BadRequest

STREAMING_OPS = frozenset({"logs", "watch", "download"})


class Request:
    """A validated request. (A plain class: the client imports this module, and dataclasses is slow to import.)"""

    __slots__ = ("id", "op", "args")

    def __init__(self, id: int, op: str, args: dict):
        self.id, self.op, self.args = id, op, args

    def __eq__(self, other) -> bool:
        return isinstance(other, Request) and (self.id, self.op, self.args) == (other.id, other.op, other.args)

    def __repr__(self) -> str:
        # Submit args carry the client's environment, which may hold secrets.
        return f"Request(id={self.id}, op={self.op!r})"


def request(id: int, op: str, args: dict | None = None) -> dict:
    return {"id": id, "op": op, "args": args or {}}


def reply_ok(id: int | None, result: object) -> dict:
    return {"id": id, "ok": True, "result": result}


def reply_error(id: int | None, error: AgentError) -> dict:
    return {"id": id, "ok": False, "error": error.to_wire()}


def stream_item(id: int, item: object) -> dict:
    return {"id": id, "item": item}


def stream_end(id: int) -> dict:
    return {"id": id, "end": True}


def request_id(message: dict) -> int | None:
    """The id to answer with, even when the rest of the request is invalid."""
    value = message.get("id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_request(message: dict) -> Request:
    """Validate an envelope and its op's arguments.

    Raises:
        BadRequest: naming the field that is missing, unknown or of the wrong type.
    """
    id = request_id(message)
    if id is None:
        raise BadRequest("request: 'id' must be an integer", details={"field": "id"})
    unknown = sorted(set(message) - {"id", "op", "args"})
    if unknown:
        raise BadRequest(f"request: unknown envelope field {unknown[0]!r}", details={"field": unknown[0]})
    from ._schema import OP_SCHEMAS   # only the agent parses requests; the client never pays for this

    op = message.get("op")
    if not isinstance(op, str):
        raise BadRequest("request: 'op' must be a string", details={"field": "op"})
    schema = OP_SCHEMAS.get(op)
    if schema is None:
        raise BadRequest(f"unknown op {op!r}; known ops: {', '.join(sorted(OP_SCHEMAS))}", details={"field": "op"})
    args = message.get("args", {})
    return Request(id=id, op=op, args=schema(args, "args"))
