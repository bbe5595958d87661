"""The Unix socket server: one task per connection, one task per request.

A connection must open with ``hello``; ten seconds without one closes it. Frames
are decoded with the shared sans-I/O decoder; an oversize frame gets a ``too_large``
error and undecodable bytes close the connection, since the stream is then out of
sync. Nothing a client sends can take down another connection or the agent: every
handler error becomes an error reply, and a bug becomes ``internal`` plus a log line.
"""

from __future__ import annotations

import errno
import grp
import os
import socket as stdsocket
from pathlib import Path

import structlog
import trio

from labrun.protocol import (
    STREAMING_OPS, AgentError, BadRequest, Forbidden, FrameCorrupt, FrameDecoder, FrameTooLarge, TooLarge,
    pack_frame, parse_request, reply_error, reply_ok, request_id, stream_end, stream_item,
)

from ._peers import peer_credentials, resolve_peer
from ._service import Service, Session

log = structlog.get_logger("labrun.server")

HANDSHAKE_TIMEOUT = 10.0
RECEIVE_SIZE = 256 * 1024


class AgentAlreadyRunning(Exception):
    pass


def socket_answers(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def refuse_if_agent_answers(path: Path) -> None:
    """Raises ``AgentAlreadyRunning`` if a live agent answers on ``path``."""
    if (path.exists() or path.is_symlink()) and socket_answers(path):
        raise AgentAlreadyRunning(f"another labrund is already listening on {path}; stop it first "
                                  "(or pass --socket to use another path)")


async def open_unix_listener(path: Path, *, system: bool, group: str | None) -> trio.SocketListener:
    """Bind the agent's socket, replacing one a dead agent left; refuse if a live agent answers there.

    Raises:
        AgentAlreadyRunning: another agent answers on ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755 if system else 0o700)
    refuse_if_agent_answers(path)
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    # Bind under a restrictive umask so the socket is never briefly open to everyone.
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    if system:
        gid = None
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                log.warning("socket.group.missing", group=group,
                            detail="the socket is open to every local user; requests are still checked per user")
        if gid is not None:
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o666)
    sock.listen(512)
    return trio.SocketListener(sock)


class ConnectionHandler:
    def __init__(self, config, service: Service):
        self.config = config
        self.service = service

    async def __call__(self, stream: trio.SocketStream) -> None:
        try:
            await self._serve(stream)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass   # the client went away
        except* Exception:
            log.exception("connection.failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        pid, uid, gid = peer_credentials(stream.socket)
        peer = resolve_peer(pid, uid, gid, self.config.admin_group)
        send_lock = trio.Lock()

        async def send(message: dict) -> None:
            data = pack_frame(message)
            await self.service.store.durable()   # nothing is told before it is committed
            async with send_lock:
                await stream.send_all(data)

        if not self.config.system and uid not in (os.geteuid(), 0):
            await send(reply_error(None, Forbidden("this is a per-user agent; it serves only its owner")))
            return
        session = Session(peer=peer)
        decoder = FrameDecoder(self.config.max_frame_bytes)
        with structlog.contextvars.bound_contextvars(peer_uid=uid, peer_pid=pid):
            try:
                async with trio.open_nursery() as requests:
                    handshake = trio.move_on_after(HANDSHAKE_TIMEOUT)
                    with handshake:
                        await self._receive_loop(stream, decoder, session, send, requests, handshake)
                    if handshake.cancelled_caught:
                        log.info("connection.handshake.timeout")
                    requests.cancel_scope.cancel()
            finally:
                session.discard_uploads()

    async def _receive_loop(self, stream, decoder, session, send, requests, handshake) -> None:
        while True:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                return
            try:
                messages = decoder.feed(data)
            except FrameTooLarge as exc:
                await send(reply_error(None, TooLarge(str(exc))))
                return
            except FrameCorrupt as exc:
                log.info("connection.corrupt", error=str(exc))
                return
            for message in messages:
                id = request_id(message)
                try:
                    request = parse_request(message)
                except AgentError as exc:
                    await send(reply_error(id, exc))
                    continue
                if request.op == "hello":
                    await self._serve_request(session, request, send)
                    if session.greeted:
                        handshake.deadline = float("inf")
                elif not session.greeted:
                    await send(reply_error(id, BadRequest("send 'hello' before any other request")))
                else:
                    requests.start_soon(self._serve_request, session, request, send)

    async def _serve_request(self, session: Session, request, send) -> None:
        handler = self.service.handlers[request.op]
        try:
            if request.op in STREAMING_OPS:
                await handler(session, request.args, lambda item: send(stream_item(request.id, item)))
                await send(stream_end(request.id))
            else:
                await send(reply_ok(request.id, await handler(session, request.args)))
        except AgentError as exc:
            await send(reply_error(request.id, exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                raise
            log.exception("request.failed", op=request.op)
            await send(reply_error(request.id, AgentError(f"agent I/O error: {exc.strerror or exc}")))
        except Exception:
            log.exception("request.failed", op=request.op)
            await send(reply_error(request.id, AgentError("internal error; the agent's log has the details")))
