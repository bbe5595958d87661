"""What the agent tells systemd, and what it takes from it: sd_notify and socket activation.

Both are plain protocols, implemented here without libsystemd:
- ``$NOTIFY_SOCKET`` gets datagrams: ``READY=1`` once recovery is done and the socket
  answers, ``STATUS=`` a one-line summary, ``WATCHDOG=1`` every half ``WatchdogSec`` from
  the event loop itself (a stuck loop stops pinging and systemd restarts the agent; runs
  survive that), and ``STOPPING=1`` at shutdown.
- ``$LISTEN_FDS``/``$LISTEN_PID``: a socket unit (``labrund.socket``) owns the listening
  socket, its mode and group; the agent takes fd 3 instead of binding a path.
Outside systemd every call here is a no-op. The variables are removed from the agent's
environment once read, so nothing the agent starts inherits them.
"""

from __future__ import annotations

import os
import socket
import stat

import structlog
import trio

log = structlog.get_logger("labrun.systemd")

SD_LISTEN_FDS_START = 3


class SocketActivationError(Exception):
    """systemd passed something the agent cannot listen on; the message says what to fix."""


def take_listen_socket() -> socket.socket | None:
    """The listening Unix socket systemd passed (socket activation), or None when there is none."""
    fds = os.environ.pop("LISTEN_FDS", None)
    pid = os.environ.pop("LISTEN_PID", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if not fds or pid != str(os.getpid()):
        return None
    count = int(fds)
    if count != 1:
        raise SocketActivationError(f"systemd passed {count} sockets; labrund.socket must have exactly one ListenStream=")
    fd = SD_LISTEN_FDS_START
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise SocketActivationError("systemd passed a file descriptor that is not a socket")
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise SocketActivationError("labrund.socket must be a Unix stream socket (ListenStream=/path)")
    return sock


class SystemdNotifier:
    """Sends sd_notify messages when the agent runs under systemd with ``Type=notify``."""

    def __init__(self) -> None:
        address = os.environ.pop("NOTIFY_SOCKET", None)
        watchdog_usec = os.environ.pop("WATCHDOG_USEC", None)
        watchdog_pid = os.environ.pop("WATCHDOG_PID", None)
        self._address = None
        if address:
            # An abstract socket's name starts with "@" in the variable and a NUL on the wire.
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval: float | None = None
        if watchdog_usec and (watchdog_pid is None or watchdog_pid == str(os.getpid())):
            self.watchdog_interval = int(watchdog_usec) / 1e6
        self._socket = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str | int) -> None:
        """Send ``KEY=value`` lines (``ready=1`` becomes ``READY=1``); never raises."""
        if self._address is None:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message, self._address)
        except OSError as exc:
            # systemd being restarted or gone must never disturb the agent.
            log.warning("systemd.notify.failed", error=str(exc))

    async def run_watchdog(self, status, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Ping the watchdog (and refresh ``STATUS=``) from the event loop until cancelled."""
        task_status.started()
        if not self.enabled:
            return
        interval = self.watchdog_interval / 2 if self.watchdog_interval else 30.0
        while True:
            fields = {"status": status()}
            if self.watchdog_interval:
                fields["watchdog"] = 1
            self.notify(**fields)
            await trio.sleep(interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
