"""``labrund``: parse arguments, read the config, take the state lock, and run the agent until a signal.

Shutdown (SIGTERM, SIGINT): stop accepting, give in-flight requests a moment, and
leave running runs running (the next agent finds them). Startup refuses clearly when
another agent holds the socket or the state directory.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
from functools import partial
from pathlib import Path

import structlog
import trio

from labrun.protocol import __version__

from ._capacity import discover_capacity
from ._config import AgentConfig, ConfigError, load_config
from ._events import EventLog
from ._hub import HubSender
from ._logging import configure_logging
from ._server import AgentAlreadyRunning, ConnectionHandler, open_unix_listener, refuse_if_agent_answers
from ._service import Service
from ._store import SchemaTooNew, Store
from ._supervisor import Supervisor
from .executors import Executor, build_executors

log = structlog.get_logger("labrun.agent")

# In-flight requests (log followers, waits) get this long after a shutdown signal.
SHUTDOWN_GRACE_SECONDS = 2.0


class StateDirLocked(Exception):
    pass


def _lock_state_dir(state_dir: Path, system: bool):
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o755 if system else 0o700)
    lock = open(state_dir / "agent.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StateDirLocked(f"another labrund is using the state directory {state_dir}") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


async def run_agent(config: AgentConfig, *, executors: dict[str, Executor] | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the agent until SIGTERM or SIGINT (or cancellation).

    Args:
        executors: by target kind; default: every registered kind (``executors.FACTORIES``).
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        lock = _lock_state_dir(config.state_dir, config.system)
        try:
            store = Store(config.state_dir / "state.db")
        except BaseException:
            lock.close()
            raise
        if executors is None:
            executors = build_executors(config, store)
        try:
            async with trio.open_nursery() as writer:
                # The store's single writer (group commits) outlives every task that writes.
                await writer.start(store.writer)
                await _serve(config, store, executors, signals, task_status)
                writer.cancel_scope.cancel()
        finally:
            with trio.move_on_after(5, shield=True):
                for executor in executors.values():
                    await executor.aclose()
            store.close()
            lock.close()
    log.info("agent.stopped")


async def _serve(config: AgentConfig, store: Store, executors: dict[str, Executor], signals, task_status) -> None:
    capacity = discover_capacity(config.resources)
    supervisor = Supervisor(config, store, capacity, executors)
    events = EventLog(store, buffer=config.subscriber_buffer)
    hub = HubSender(config.hub, store, events) if config.hub is not None else None
    service = Service(config, store, supervisor, events, hub)
    refuse_if_agent_answers(config.socket)
    socket_inode = None
    try:
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as nursery:
                # Recover first: a client that can connect sees the runs as they really are.
                await nursery.start(supervisor.run)
                if hub is not None:
                    await nursery.start(hub.run)
                await nursery.start(events.retain, config.retention_days,
                                    (lambda: hub.delivered) if hub is not None else (lambda: None))
                listener = await open_unix_listener(config.socket, system=config.system, group=config.socket_group)
                socket_inode = os.stat(config.socket).st_ino
                await nursery.start(partial(trio.serve_listeners, ConnectionHandler(config, service),
                                            [listener], handler_nursery=handlers))
                store.add_event("agent.started", {"version": __version__, "pid": os.getpid()})
                log.info("agent.started", socket=str(config.socket), state_dir=str(config.state_dir),
                         version=__version__, cpus=capacity.cpus, gpus=list(capacity.gpus))
                task_status.started()
                async for signum in signals:
                    log.info("agent.stopping", signal=signal.Signals(signum).name)
                    break
                store.add_event("agent.stopping", {"pid": os.getpid()})
                nursery.cancel_scope.cancel()
            handlers.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE_SECONDS
    finally:
        try:
            if socket_inode is not None and os.stat(config.socket).st_ino == socket_inode:
                config.socket.unlink()
        except FileNotFoundError:
            pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labrund", description="The labrun agent: queues and runs jobs on this machine.")
    parser.add_argument("--socket", type=Path, default=os.environ.get("LABRUN_SOCKET") or None,
                        help="Unix socket to listen on (default: $LABRUN_SOCKET, else the config's, else "
                             "/run/labrun/agent.sock for root and $XDG_RUNTIME_DIR/labrun/agent.sock otherwise)")
    parser.add_argument("--state-dir", type=Path, help="where runs, logs and the database live")
    parser.add_argument("--config", type=Path, help="TOML config (default: /etc/labrun/agent.toml for root, "
                                                     "~/.config/labrun/agent.toml otherwise, if present)")
    parser.add_argument("--log-level", default=os.environ.get("LABRUN_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--version", action="version", version=f"labrund {__version__}")
    return parser


def default_config_path() -> Path | None:
    from labrun.protocol._paths import SYSTEM_CONFIG, user_config

    path = Path(SYSTEM_CONFIG if os.geteuid() == 0 else user_config())
    return path if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config or default_config_path(), socket=args.socket, state_dir=args.state_dir)
    except ConfigError as exc:
        print(f"labrund: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    refusals = []
    try:
        trio.run(run_agent, config)
    except* (AgentAlreadyRunning, StateDirLocked, SchemaTooNew) as group:
        refusals = group.exceptions
    for exc in refusals:
        print(f"labrund: {exc}", file=sys.stderr)
    return 1 if refusals else 0


if __name__ == "__main__":
    sys.exit(main())
