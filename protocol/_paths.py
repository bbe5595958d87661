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
    return f"/tmp/labrun-{os.getuid()}/agent.sock"


def user_state_dir() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "labrun")


def user_config() -> str:
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config, "labrun", "agent.toml")


def candidate_sockets() -> list[str]:
    """The sockets a client tries, in order."""
    explicit = os.environ.get("LABRUN_SOCKET")
    if explicit:
        return [explicit]
    return [SYSTEM_SOCKET, user_socket()]
