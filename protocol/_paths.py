"""Where agents listen and keep state, known to both the agent and the clients.

System agent: socket ``/run/labrun/agent.sock``, state ``/var/lib/labrun``.
Per-user agent: socket ``$XDG_RUNTIME_DIR/labrun/agent.sock`` (else
``/tmp/labrun-<uid>/agent.sock``), state ``$XDG_STATE_HOME/labrun`` (else
``~/.local/state/labrun``). Clients look at ``LABRUN_SOCKET``, then the system
socket, then the per-user socket.
"""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_SOCKET = Path("/run/labrun/agent.sock")
SYSTEM_STATE_DIR = Path("/var/lib/labrun")
SYSTEM_CONFIG = Path("/etc/labrun/agent.toml")


def user_socket() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "labrun" / "agent.sock"
    return Path(f"/tmp/labrun-{os.getuid()}") / "agent.sock"


def user_state_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME")
    base = Path(state) if state else Path.home() / ".local" / "state"
    return base / "labrun"


def user_config() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME")
    base = Path(config) if config else Path.home() / ".config"
    return base / "labrun" / "agent.toml"


def candidate_sockets() -> list[Path]:
    """The sockets a client tries, in order."""
    explicit = os.environ.get("LABRUN_SOCKET")
    if explicit:
        return [Path(explicit)]
    return [SYSTEM_SOCKET, user_socket()]
