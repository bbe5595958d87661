"""A blocking connection to the agent: connect, ``hello``, then one call at a time.

Built on the protocol's sans-I/O codec, with the standard library's socket module
only, so it imports anywhere a training script runs.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator

from labrun.protocol._errors import AgentError, ProtocolError
from labrun.protocol._framing import FrameDecoder, pack_frame
from labrun.protocol._messages import request
from labrun.protocol._version import PROTOCOL_VERSION

from .exceptions import AgentUnavailable

RECEIVE_SIZE = 256 * 1024


class AgentConnection:
    def __init__(self, path: str | os.PathLike, *, client: str = "labrun-python"):
        self.path = os.fspath(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise AgentUnavailable(f"no labrun agent answers on {self.path}: {exc.strerror or exc}") from None
        self._decoder = FrameDecoder()
        self._pending: list[dict] = []
        self._ids = itertools.count(1)
        self.agent = self.call("hello", protocol=PROTOCOL_VERSION, client=client)

    def close(self) -> None:
        self._sock.close()

    def __del__(self):
        # Azure ML code never closes a workspace: a dropped connection closes quietly.
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send(self, op: str, args: dict) -> int:
        id = next(self._ids)
        try:
            self._sock.sendall(pack_frame(request(id, op, args)))
        except OSError as exc:
            raise AgentUnavailable(f"lost the connection to the agent at {self.path}: {exc}") from None
        return id

    def _receive(self) -> dict:
        while not self._pending:
            try:
                data = self._sock.recv(RECEIVE_SIZE)
            except TimeoutError:
                raise
            except OSError as exc:
                raise AgentUnavailable(f"lost the connection to the agent at {self.path}: {exc}") from None
            if not data:
                raise AgentUnavailable(f"the agent at {self.path} closed the connection")
            try:
                self._pending.extend(self._decoder.feed(data))
            except ProtocolError as exc:
                raise AgentUnavailable(f"the agent at {self.path} sent an invalid frame: {exc}") from None
        return self._pending.pop(0)

    def _reply_for(self, id: int) -> dict:
        message = self._receive()
        if message.get("id") not in (id, None):
            raise AgentUnavailable(f"the agent answered request {message.get('id')} while we waited for {id}")
        if message.get("ok") is False:
            raise AgentError.from_wire(message.get("error") or {})
        return message

    def call(self, op: str, **args) -> object:
        """Send one request and return its result; an error reply raises its ``AgentError``."""
        id = self._send(op, args)
        return self._reply_for(id)["result"]

    def stream(self, op: str, *, timeout: float | None = None, **args) -> Iterator:
        """Send one streaming request and yield its items until the stream ends.

        Closing the iterator early closes the connection, since the agent may still be sending.
        ``timeout`` bounds the wait for each item (``TimeoutError`` past it).
        """
        self._sock.settimeout(timeout)
        id = self._send(op, args)
        finished = False
        try:
            while True:
                message = self._reply_for(id)
                if message.get("end"):
                    finished = True
                    return
                yield message["item"]
        finally:
            if not finished:
                self.close()
