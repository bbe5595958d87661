"""Logging, configured once: structlog to stderr, JSON when not a TTY (systemd's journal), console otherwise.

Stdlib loggers (trio, httpx) go through the same chain. Event names are dotted
snake case (``run.start.failed``). Environment variables and run tokens are never
passed to a log call.

``import structlog`` imports its ``stdlib`` and ``_native`` modules, and they import ``asyncio`` (about 30
modules and 1.5 MiB of an idle agent's memory) for async log methods the agent never calls. This module is the
agent package's first import, and it imports structlog with a stand-in for ``asyncio`` that imports the real
module on its first use. Only structlog holds the stand-in; everything else imports ``asyncio`` as usual (the
Docker executor's bridge, when a container runs).
"""

from __future__ import annotations

import importlib
import logging
import sys
import types


class _ImportedOnFirstUse(types.ModuleType):
    """Stands in for a module: reading any of its attributes imports the module and reads it there."""

    def __getattr__(self, name):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)


def _import_structlog() -> None:
    if "structlog" in sys.modules or "asyncio" in sys.modules:
        return
    stand_in = sys.modules["asyncio"] = _ImportedOnFirstUse("asyncio")
    try:
        import structlog  # noqa: F401
    finally:
        if sys.modules.get("asyncio") is stand_in:
            del sys.modules["asyncio"]


_import_structlog()

import structlog  # noqa: E402
import structlog.tracebacks  # noqa: E402


def configure_logging(level: str = "info") -> None:
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        # Never the frames' locals: they may hold a client's environment or a run token.
        shared.append(structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)))
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        # Level first: a filtered-out line costs nothing to render.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=[
        structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
