"""labrund, the labrun agent: a daemon that queues and runs jobs on this machine.

The server (``_server``) accepts clients on a Unix socket; the service (``_service``)
answers their requests; the supervisor (``_supervisor``) owns the queue and the
active runs, asking the pure scheduler (``_scheduler``) what starts; executors
(``executors``, one module per target kind) run them; the store (``_store``) keeps
everything in SQLite.
"""

from . import _logging  # noqa: F401  (first: it imports structlog without asyncio)
from ._config import AgentConfig as AgentConfig, ConfigError as ConfigError, load_config as load_config
from ._main import main as main, run_agent as run_agent

__all__ = ["AgentConfig", "ConfigError", "load_config", "main", "run_agent"]
