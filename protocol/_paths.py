"""Where agents listen and keep state, known to both the agent and the clients.

System agent: socket ``/run/labrun/agent.sock``, state ``/var/lib/labrun``.
Per-user agent: socket ``$XDG_RUNTIME_DIR/labrun/agent.sock`` (else
``/tmp/labrun-<uid>/agent.sock``), state ``$XDG_STATE_HOME/labrun`` (else
``~/.local/state/labrun``). Clients look at ``LABRUN_SOCKET``, then the system
socket, then the per-user socket.
"""

from __future__ import annotations

import os

# Plain strings: the CLI imports this module, and pathlib is slow to import.
SYSTEM_SOCKET = "/run/labrun/agent.sock"
SYSTEM_STATE_DIR = "/var/lib/labrun"
SYSTEM_CONFIG = "/etc/labrun/agent.toml"


def user_socket() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "labrun", "agent.sock")
    return os.path.join(tmp_fallback_dir(), "agent.sock")


def user_state_dir() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "labrun")


def user_config() -> str:
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config, "labrun", "agent.toml")


def tmp_fallback_dir() -> str:
    """The per-user socket's directory when there is no ``XDG_RUNTIME_DIR``: in ``/tmp``, so anyone could
    have made it first; clients and agents use it only if it is the user's own and 0700."""
    return f"/tmp/labrun-{os.getuid()}"


def private_dir_problem(path: str, uid: int) -> str | None:
    """Why ``path`` is not a directory private to ``uid`` (theirs, not a link, mode 0700), or None."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path} cannot be examined: {exc.strerror}"
    if (info.st_mode & 0o170000) != 0o040000:
        return f"{path} is not a directory (a link or file someone else may have put there)"
    if info.st_uid != uid:
        return f"{path} belongs to uid {info.st_uid}, not to you (uid {uid}): someone else may have made it first"
    if info.st_mode & 0o077:
        return f"{path} has mode {info.st_mode & 0o777:o}; it must be 0700"
    return None


def candidate_sockets() -> list[str]:
    """The sockets a client tries, in order."""
    explicit = os.environ.get("LABRUN_SOCKET")
    if explicit:
        return [explicit]
    return [SYSTEM_SOCKET, user_socket()]
