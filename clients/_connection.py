"""A blocking connection to the agent: connect, ``hello``, then one call at a time.

Built on the protocol's sans-I/O codec, with the standard library's socket module
only, so it imports anywhere a training script runs.

Before sending anything (the client's environment and source travel in a submit), the
connection checks who serves the socket (SO_PEERCRED): the system socket must be root's,
any other socket root's or the user's own; the ``/tmp`` fallback directory must be the
user's and 0700. A squatter gets nothing but a refusal that says why.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import struct
from collections.abc import Iterator

# The C socket type itself. The socket module's class adds only what a connection never uses (makefile, dup,
# enum-valued family and type), and importing it (with enum and selectors) cost each CLI command about 3 ms.
from _socket import AF_UNIX, SCM_RIGHTS, SO_PEERCRED, SOCK_STREAM, SOL_SOCKET
from _socket import socket as _Socket

from labrun.protocol._errors import AgentError, ProtocolError
from labrun.protocol._framing import MAX_FDS_PER_MESSAGE, FrameDecoder, pack_frame
from labrun.protocol._messages import request
from labrun.protocol._paths import SYSTEM_SOCKET, private_dir_problem, tmp_fallback_dir
from labrun.protocol._version import PROTOCOL_VERSION

from .exceptions import AgentAccessDenied, AgentUnavailable, AgentUntrusted

RECEIVE_SIZE = 256 * 1024
_UCRED = struct.Struct("3i")   # SO_PEERCRED: pid, uid, gid


def _user_name(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _check_server(path: str, sock: _Socket) -> None:
    """Refuse a server that is neither root nor this user (nor root, for the system socket)."""
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(SOL_SOCKET, SO_PEERCRED, _UCRED.size))
    if path == SYSTEM_SOCKET:
        if uid != 0:
            raise AgentUntrusted(f"refusing the agent at {path}: it runs as {_user_name(uid)}, and the system "
                                 "agent must run as root; ask an administrator to check the labrun service")
    elif uid not in (0, os.getuid()):
        raise AgentUntrusted(f"refusing the agent at {path}: it runs as {_user_name(uid)}, not as you or root, "
                             "so it could be another user's trap for your environment and source; remove the "
                             "socket or point LABRUN_SOCKET at your own agent")


def _access_denied_message(path: str) -> str:
    group = None
    # The socket's group, or its directory's when that is what keeps the user out.
    for where in (path, os.path.dirname(path)):
        try:
            import grp

            group = grp.getgrgid(os.stat(where).st_gid).gr_name
            break
        except (ImportError, KeyError, OSError):
            pass
    if group == "root":
        group = None
    ask = f"ask an administrator to add you to the group '{group}'" if group else "ask an administrator for access"
    return (f"the labrun agent at {path} does not accept you: {ask}, then log in again. "
            "(labrun does not start a private agent beside the system one: its runs would share the same "
            "cores and GPUs without either agent knowing.)")


class AgentConnection:
    def __init__(self, path: str | os.PathLike, *, client: str = "labrun-python"):
        self.path = os.fspath(path)
        self._client = client
        self._ids = itertools.count(1)
        self._open()

    def _open(self) -> None:
        if os.path.dirname(os.path.abspath(self.path)) == tmp_fallback_dir():
            problem = private_dir_problem(tmp_fallback_dir(), os.getuid())
            if problem:
                raise AgentUntrusted(f"refusing the agent socket {self.path}: {problem}")
        self._sock = _Socket(AF_UNIX, SOCK_STREAM)
        try:
            self._sock.connect(self.path)
            _check_server(self.path, self._sock)
        except OSError as exc:
            self._sock.close()
            if exc.errno == errno.EACCES:
                raise AgentAccessDenied(_access_denied_message(self.path)) from None
            raise AgentUnavailable(f"no labrun agent answers on {self.path}: {exc.strerror or exc}") from None
        except AgentUntrusted:
            self._sock.close()
            raise
        self._decoder = FrameDecoder()
        self._pending: list[dict] = []
        self.agent = self.call("hello", protocol=PROTOCOL_VERSION, client=self._client)

    def _closed_by_agent(self) -> bool:
        """Whether the agent has closed this idle connection (or said it is about to: its idle notice)."""
        if self._pending:
            return False
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _refresh(self) -> None:
        """Reconnect first if the agent closed the connection while we were not using it (idle timeout)."""
        if self._closed_by_agent():
            self._sock.close()
            self._open()

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

    def _send(self, op: str, args: dict, fds: list[int] = ()) -> int:
        id = next(self._ids)
        data = pack_frame(request(id, op, args))
        try:
            # The files travel with the frame's first bytes, as many with each byte as one message may carry; the
            # agent gives them to the frame they came with.
            for start in range(0, len(fds), MAX_FDS_PER_MESSAGE):
                chunk = fds[start:start + MAX_FDS_PER_MESSAGE]
                self._sock.sendmsg([data[:1]], [(SOL_SOCKET, SCM_RIGHTS, struct.pack(f"{len(chunk)}i", *chunk))])
                data = data[1:]
            self._sock.sendall(data)
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
            error = message.get("error") or {}
            if message.get("id") is None and (error.get("details") or {}).get("reason"):
                # The agent closed this connection (idle, say) just as we sent: as if it had gone away.
                raise AgentUnavailable(f"the agent at {self.path} closed the connection: {error.get('message')}")
            raise AgentError.from_wire(error)
        return message

    def call(self, op: str, **args) -> object:
        """Send one request and return its result; an error reply raises its ``AgentError``."""
        if op != "hello":
            self._refresh()
        id = self._send(op, args)
        return self._reply_for(id)["result"]

    def call_passing(self, op: str, fds: list[int], **args) -> object:
        """``call``, passing the open files ``fds`` with the request (SCM_RIGHTS); they stay open here.

        The frame must have a byte for each ``MAX_FDS_PER_MESSAGE`` of them (so up to a few thousand).
        """
        self._refresh()
        id = self._send(op, args, fds)
        return self._reply_for(id)["result"]

    def stream(self, op: str, *, timeout: float | None = None, **args) -> Iterator:
        """Send one streaming request and yield its items until the stream ends.

        Closing the iterator early closes the connection, since the agent may still be sending.
        ``timeout`` bounds the wait for each item (``TimeoutError`` past it).
        """
        self._refresh()
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
