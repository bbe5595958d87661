"""Finding the agent, and starting a per-user one when none answers.

Order: ``LABRUN_SOCKET``, then the system socket ``/run/labrun/agent.sock``, then the
per-user socket. When none answers (and ``LABRUN_NO_AUTOSTART`` is not set), a
per-user agent is started in the background on the per-user socket, as its own
session so it outlives the client; its log goes to ``<state>/agent.log``.
"""

from __future__ import annotations

import os
import sys
import time

from labrun.protocol._paths import candidate_sockets, private_dir_problem, user_socket, user_state_dir

from ._connection import AgentConnection
from .exceptions import AgentAccessDenied, AgentUnavailable, AgentUntrusted

AUTOSTART_TIMEOUT = 15.0


def _try(path: str) -> AgentConnection | None:
    """A connection, or None when nothing answers; refusals (access denied, untrusted) propagate."""
    try:
        if not os.path.exists(path):
            return None
        return AgentConnection(path)
    except (AgentAccessDenied, AgentUntrusted):
        raise
    except AgentUnavailable:
        return None


def connect(socket: str | os.PathLike | None = None, *, autostart: bool | None = None) -> AgentConnection:
    """Connect to the agent at ``socket``, or find one (starting a per-user agent if allowed)."""
    if socket is not None:
        return AgentConnection(socket)
    candidates = candidate_sockets()
    for path in candidates:
        connection = _try(path)
        if connection is not None:
            return connection
    if autostart is None:
        autostart = os.environ.get("LABRUN_NO_AUTOSTART", "") in ("", "0")
    if not autostart or os.environ.get("LABRUN_SOCKET"):
        tried = ", ".join(candidates)
        raise AgentUnavailable(f"no labrun agent answers (tried {tried}); start one with 'labrun agent'"
                               + ("" if autostart else " (autostart is off: LABRUN_NO_AUTOSTART is set)"))
    return start_user_agent()


def start_user_agent() -> AgentConnection:
    path = user_socket()
    state = user_state_dir()
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.lstat(directory)
    if info.st_uid == os.getuid() and (info.st_mode & 0o170000) == 0o040000 and info.st_mode & 0o077:
        # Ours and a real directory, left open by an older labrun: nobody else could write in it, so tighten it.
        os.chmod(directory, 0o700)
    problem = private_dir_problem(directory, os.getuid())
    if problem:
        raise AgentUntrusted(f"not starting a per-user agent on {path}: {problem}")
    os.makedirs(state, mode=0o700, exist_ok=True)
    try:
        import trio  # noqa: F401  (only to tell whether the agent's dependencies are installed)
    except ImportError:
        raise AgentUnavailable("no labrun agent answers and this environment cannot start one: "
                               "install 'labrun[agent]' or point LABRUN_SOCKET at a running agent") from None
    log_path = os.path.join(state, "agent.log")
    with open(log_path, "ab") as log:
        import subprocess   # only to start an agent: most calls find one

        process = subprocess.Popen(
            [sys.executable, "-m", "labrun.agent", "--socket", path, "--state-dir", state],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
        )
    deadline = time.monotonic() + AUTOSTART_TIMEOUT
    while time.monotonic() < deadline:
        connection = _try(path)
        if connection is not None:
            return connection
        if process.poll() is not None:
            # Another client may have started one at the same moment; ours then refused.
            connection = _try(path)
            if connection is not None:
                return connection
            raise AgentUnavailable(f"the per-user agent exited with code {process.returncode}; "
                                   f"see {log_path}")
        time.sleep(0.02)
    raise AgentUnavailable(f"the per-user agent did not answer on {path} within {AUTOSTART_TIMEOUT:.0f} s; "
                           f"see {log_path}")
