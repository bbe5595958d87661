"""Logging, configured once: structlog to stderr, JSON when not a TTY (systemd's journal), console otherwise.

Stdlib loggers (trio, httpx) go through the same chain. Event names are dotted
snake case (``run.start.failed``). Environment variables and run tokens are never
passed to a log call.
"""

from __future__ import annotations

import logging
import sys

import structlog
import structlog.tracebacks


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
