"""The Unix socket server: one task per connection, one task per request.

A connection must open with ``hello``; ten seconds without one closes it. After it,
a connection with nothing in flight is closed after ``limits.idle_timeout_seconds``,
and a frame must finish within ``limits.frame_timeout_seconds``; the agent says why
in a last error frame (id nil) before closing. Bytes buffered, requests in flight
and connections are counted by ``Limits``, which refuses past its budgets. Frames
are decoded with the shared sans-I/O decoder; an oversize frame gets a ``too_large``
error and undecodable bytes close the connection, since the stream is then out of
sync. Nothing a client sends can take down another connection or the agent: every
handler error becomes an error reply, and a bug becomes ``internal`` plus a log line.
"""

from __future__ import annotations

import array
import errno
import grp
import os
import socket as stdsocket
from pathlib import Path

import structlog
import trio

from labrun.protocol import (
    STREAMING_OPS, AgentError, BadRequest, Forbidden, FrameCorrupt, FrameDecoder, FrameTooLarge, TooLarge,
    Unavailable, pack_frame, parse_request, reply_error, reply_ok, request_id, stream_end, stream_item,
)

from labrun.protocol._framing import MAX_FDS_PER_MESSAGE
from labrun.protocol._paths import tmp_fallback_dir

from . import _ingest
from ._artifacts import os_error_reply
from ._faults import DISK_ERRNOS, is_disk_error
from ._limits import Limits
from ._peers import peer_credentials, resolve_peer
from ._service import Service, Session

log = structlog.get_logger("labrun.server")

HANDSHAKE_TIMEOUT = 10.0
# Ops that change nothing and describe the agent: answered without waiting for a pending commit, so that on a
# full state disk, when a batch waits for space, ``labrun status`` still shows the fault.
ANSWERED_AT_ONCE = frozenset({"hello", "status"})
# Ops whose reply promises nothing that a crash before the commit could take back: ``blob_fds`` answers hashes
# (true whatever happens to the store); the submit that uses them waits for the same commit before its reply.
NEEDS_NO_COMMIT = frozenset({"blob_fds"})
RECEIVE_SIZE = 256 * 1024
# Room for the most descriptors one message can pass; more would be cut off (MSG_CTRUNC) and refused.
FD_ANCILLARY = stdsocket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)


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


class SocketDirectoryUnsafe(Exception):
    """The socket's directory could let another user replace the socket."""


def check_socket_directory(path: Path, *, system: bool) -> None:
    """Create the socket's directory if needed; it must be the agent's own (or root's), and writable only
    by its owner unless sticky: otherwise another user could swap the socket for theirs and catch the
    clients.

    Raises:
        SocketDirectoryUnsafe: naming the directory and what is wrong with it.
    """
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True, mode=0o755 if system else 0o700)
    info = directory.lstat()
    if (info.st_mode & 0o170000) != 0o040000:
        raise SocketDirectoryUnsafe(f"the socket directory {directory} is a symbolic link or not a directory")
    if info.st_uid not in (os.geteuid(), 0):
        raise SocketDirectoryUnsafe(f"the socket directory {directory} belongs to uid {info.st_uid}, not to this "
                                    "agent's user: another user may have made it first; remove it or pick another "
                                    "--socket")
    if info.st_mode & 0o022 and not info.st_mode & 0o1000:
        raise SocketDirectoryUnsafe(f"the socket directory {directory} is writable by other users "
                                    f"(mode {info.st_mode & 0o7777:o}); pick another --socket")
    if directory == Path(tmp_fallback_dir()) and info.st_mode & 0o077:
        raise SocketDirectoryUnsafe(f"the socket directory {directory} must be 0700 (it is "
                                    f"{info.st_mode & 0o777:o})")


async def open_unix_listener(path: Path, *, system: bool, group: str | None) -> trio.SocketListener:
    """Bind the agent's socket, replacing one a dead agent left; refuse if a live agent answers there.

    Raises:
        AgentAlreadyRunning: another agent answers on ``path``.
    """
    check_socket_directory(path, system=system)
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


def passed_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in ``recvmsg``'s ancillary data (SCM_RIGHTS)."""
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == stdsocket.SOL_SOCKET and kind == stdsocket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


def cut_off(received: int) -> AgentError:
    """Why the kernel cut off the open files passed with a message (MSG_CTRUNC), given how many arrived."""
    if received >= MAX_FDS_PER_MESSAGE:
        return BadRequest(f"more than {MAX_FDS_PER_MESSAGE} open files in one message; closing")
    # Room for them was there: the kernel could not give the agent more descriptors.
    log.error("connection.fds_lost", received=received)
    return Unavailable("the agent is at its open-file limit and could not take the open files passed to it; "
                       "closing the connection (try again later)",
                       details={"limit": "open_files"})


class PassedFds:
    """The open files a client passed with its frames (SCM_RIGHTS): queued until the ``blob_fds`` frame they came
    with claims them, counted against the limits while the agent holds them, and closed on every path.

    Closed in the user's worker threads (``threads``), by tasks of ``closing``: a close flushes the file to its
    filesystem, and a user's own (FUSE) may never answer. The user's count drops once a close has returned.
    """

    def __init__(self, limits: Limits, uid: int, closing: trio.Nursery, threads: trio.CapacityLimiter):
        self.limits = limits
        self.uid = uid
        self.closing = closing
        self.threads = threads
        self.queued: list[int] = []
        self.held = 0

    def receive(self, fds: list[int]) -> None:
        """Queue descriptors that just came in.

        Raises:
            Unavailable: past the limits on descriptors held (they are closed).
        """
        try:
            self.limits.hold_fds(self.uid, self.held, len(fds))
        except AgentError:
            self.closing.start_soon(self._close, fds, 0)
            raise
        self.queued += fds
        self.held += len(fds)

    def claim(self, count: int) -> list[int]:
        """The next ``count`` queued descriptors, for the request they came with.

        Raises:
            BadRequest: fewer came (what did stays queued, to be closed as strays).
        """
        if count > len(self.queued):
            raise BadRequest(f"blob_fds: count is {count}, but {len(self.queued)} open files came with the frame",
                             details={"field": "args.count"})
        claimed, self.queued = self.queued[:count], self.queued[count:]
        return claimed

    def close(self, fds: list[int]) -> None:
        if fds:
            self.held -= len(fds)
            self.closing.start_soon(self._close, fds, len(fds))

    async def _close(self, fds: list[int], counted: int) -> None:
        try:
            await trio.to_thread.run_sync(_ingest.close_all, fds, limiter=self.threads, abandon_on_cancel=True)
        finally:
            self.limits.release_fds(self.uid, counted)

    def close_queued(self) -> int:
        """Close what no request claimed; returns how many there were."""
        strays, self.queued = self.queued, []
        self.close(strays)
        return len(strays)


class _ConnectionState:
    """A connection's counters, and when its receive loop gives up: handshake, idle (nothing in flight) or an
    unfinished frame."""

    def __init__(self, limits, scope: trio.CancelScope):
        self.limits = limits
        self.scope = scope
        self.greeted = False
        self.in_flight = 0
        self.handshake_by = trio.current_time() + HANDSHAKE_TIMEOUT
        self.last_activity = trio.current_time()
        self.frame_started: float | None = None
        self.buffered = 0   # bytes of an unfinished frame counted against the limits

    def rearm(self) -> None:
        if not self.greeted:
            deadline = self.handshake_by
        elif self.in_flight:
            deadline = float("inf")
        else:
            deadline = self.last_activity + self.limits.idle_timeout_seconds
        if self.frame_started is not None:
            deadline = min(deadline, self.frame_started + self.limits.frame_timeout_seconds)
        self.scope.deadline = deadline

    def reason(self) -> str:
        now = trio.current_time()
        if self.frame_started is not None and now >= self.frame_started + self.limits.frame_timeout_seconds:
            return "frame_timeout"
        return "idle_timeout" if self.greeted else "handshake_timeout"


_TIMEOUT_MESSAGES = {
    "handshake_timeout": f"no 'hello' within {HANDSHAKE_TIMEOUT:g} seconds; closing",
    "idle_timeout": "connection idle for {idle:g} seconds with nothing in flight (limits.idle_timeout_seconds); "
                    "closing. Clients reconnect on their next call",
    "frame_timeout": "a frame begun {frame:g} seconds ago is still unfinished (limits.frame_timeout_seconds); closing",
}


def listener_from_socket(sock: stdsocket.socket) -> trio.SocketListener:
    """A listener on a socket someone else bound (systemd's socket activation): its path, mode and group are theirs."""
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


class ConnectionHandler:
    def __init__(self, config, service: Service, limits: Limits, closing: trio.Nursery):
        self.config = config
        self.service = service
        self.limits = limits
        self.closing = closing   # where the files clients passed are closed (``PassedFds``)

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
        send_lock = trio.Lock()

        async def send(message: dict, *, durable: bool = True) -> None:
            data = pack_frame(message)
            if durable:
                await self.service.store.durable()   # nothing is told before it is committed
            async with send_lock:
                await stream.send_all(data)

        async def refuse(error: AgentError) -> None:
            # The peer may not be reading: a refusal never holds the connection open for long.
            with trio.move_on_after(1):
                await send(reply_error(None, error))

        if not self.config.system and uid not in (os.geteuid(), 0):
            await refuse(Forbidden("this is a per-user agent; it serves only its owner"))
            return
        try:
            self.limits.admit(uid, stream.socket.fileno())
        except AgentError as exc:
            log.warning("connection.refused", peer_uid=uid, limit=exc.details.get("limit"))
            await refuse(exc)
            return
        try:
            peer = resolve_peer(pid, uid, gid, self.config.admin_group)
            session = Session(peer=peer)
            decoder = FrameDecoder(self.config.max_frame_bytes)
            state = _ConnectionState(self.limits.config, trio.CancelScope())
            passed = PassedFds(self.limits, uid, self.closing, self.service.ingest_slots(uid)[0])
            with structlog.contextvars.bound_contextvars(peer_uid=uid, peer_pid=pid):
                try:
                    async with trio.open_nursery() as requests:
                        with state.scope:
                            state.rearm()
                            await self._receive_loop(stream, decoder, session, send, requests, state, passed)
                        if state.scope.cancelled_caught:
                            reason = state.reason()
                            log.info("connection.closed", reason=reason)
                            await refuse(Unavailable(_TIMEOUT_MESSAGES[reason].format(
                                idle=self.limits.config.idle_timeout_seconds,
                                frame=self.limits.config.frame_timeout_seconds), details={"reason": reason}))
                        requests.cancel_scope.cancel()
                finally:
                    self.limits.buffer(uid, state.buffered, 0)
                    passed.close_queued()   # (claimed ones were closed by their requests, all ended now)
                    session.discard_uploads()
                    # The client went away (a cancel here means the agent is stopping: its interactive runs
                    # are failed as agent_lost when it starts again).
                    if trio.current_effective_deadline() != float("-inf"):
                        self.service.disconnected(session)
        finally:
            self.limits.release(uid)

    async def _receive_loop(self, stream, decoder, session, send, requests, state: _ConnectionState,
                            passed: PassedFds) -> None:
        uid = session.peer.uid
        while True:
            # recvmsg, not recv: a recv would drop the open files a client passes with its blob_fds frames.
            try:
                data, ancillary, flags, _ = await stream.socket.recvmsg(RECEIVE_SIZE, FD_ANCILLARY,
                                                                        stdsocket.MSG_CMSG_CLOEXEC)
            except OSError:   # reset by the client
                return
            received = passed_fds(ancillary) if ancillary else []
            if received:
                try:
                    passed.receive(received)
                except AgentError as exc:
                    log.warning("connection.refused", limit=exc.details.get("limit"))
                    await send(reply_error(None, exc))
                    return
            # Checked with or without descriptors: an agent at its open-file limit receives none of them.
            if flags & stdsocket.MSG_CTRUNC:
                await send(reply_error(None, cut_off(len(received))))
                return
            if not data:
                return
            try:
                messages = decoder.feed(data)
            except FrameTooLarge as exc:
                await send(reply_error(None, TooLarge(f"{exc} (limits.buffer_bytes_per_connection)")))
                return
            except FrameCorrupt as exc:
                log.info("connection.corrupt", error=str(exc))
                return
            try:
                # What stays buffered is an unfinished frame: it counts against the user's and the agent's
                # budgets until it completes (at most one read's worth is held beyond them).
                self.limits.buffer(uid, state.buffered, decoder.pending)
                state.buffered = decoder.pending
            except AgentError as exc:
                log.warning("connection.refused", limit=exc.details.get("limit"))
                await send(reply_error(None, exc))
                return
            state.last_activity = trio.current_time()
            if decoder.pending == 0:
                state.frame_started = None
            elif messages or state.frame_started is None:
                state.frame_started = state.last_activity
            for message in messages:
                id = request_id(message)
                fds: list[int] = []
                try:
                    request = parse_request(message)
                    if request.op == "blob_fds":
                        fds = request.args["fds"] = passed.claim(request.args["count"])
                except AgentError as exc:
                    await send(reply_error(id, exc))
                    continue
                try:
                    if request.op == "hello":
                        await self._serve_request(session, request, send)
                        state.greeted = session.greeted
                    elif not session.greeted:
                        await send(reply_error(id, BadRequest("send 'hello' before any other request")))
                    else:
                        try:
                            self.limits.start_request(uid, state.in_flight)
                        except AgentError as exc:
                            await send(reply_error(id, exc))
                            continue
                        state.in_flight += 1
                        requests.start_soon(self._counted_request, session, request, send, state, passed, fds)
                        fds = []   # the request closes them
                finally:
                    passed.close(fds)
            if decoder.pending == 0 and passed.queued:
                # Every frame received is whole and has claimed its files: these came with none that takes them.
                strays = passed.close_queued()
                await send(reply_error(None, BadRequest(f"{strays} open files came with frames that take none; "
                                                        "closing")))
                return
            state.rearm()

    async def _counted_request(self, session: Session, request, send, state: _ConnectionState, passed: PassedFds,
                               fds: list[int]) -> None:
        try:
            await self._serve_request(session, request, send)
        finally:
            passed.close(fds)
            state.in_flight -= 1
            self.limits.end_request(session.peer.uid)
            state.last_activity = trio.current_time()
            state.rearm()

    async def _serve_request(self, session: Session, request, send) -> None:
        handler = self.service.handlers[request.op]
        try:
            if request.op in STREAMING_OPS:
                await handler(session, request.args, lambda item: send(stream_item(request.id, item)))
                await send(stream_end(request.id))
            else:
                await send(reply_ok(request.id, await handler(session, request.args)),
                           durable=request.op not in ANSWERED_AT_ONCE and request.op not in NEEDS_NO_COMMIT)
        except AgentError as exc:
            await send(reply_error(request.id, exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                raise
            error = os_error_reply(exc)
            if exc.errno in DISK_ERRNOS:
                self.service.supervisor.faults.report("files", exc)
            if error.code == "internal":
                log.exception("request.failed", op=request.op)
            else:
                log.info("request.refused", op=request.op, error=str(exc))
            await send(reply_error(request.id, error))
        except Exception as exc:
            if is_disk_error(exc):
                self.service.supervisor.faults.report("store", exc)
                await send(reply_error(request.id, os_error_reply(OSError(errno.ENOSPC, str(exc)))))
                return
            log.exception("request.failed", op=request.op)
            await send(reply_error(request.id, AgentError("internal error; the agent's log has the details")))
