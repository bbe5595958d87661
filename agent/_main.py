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
import sqlite3
import sys
import time
from functools import partial
from pathlib import Path

import structlog
import trio

from labrun.protocol import __version__
from labrun.protocol._statuses import QUEUED, TERMINAL

from ._asuser import agent_dir
from ._capacity import discover_capacity
from ._config import AgentConfig, ConfigError, load_config
from ._events import EventLog
from ._faults import Faults, is_disk_error
from ._hub import HubSender
from ._limits import Limits, raise_fd_limit, tune_malloc
from ._logging import configure_logging
from ._mlflow_setup import Mlflow
from ._retention import RunFiles
from ._server import (
    AgentAlreadyRunning, ConnectionHandler, SocketDirectoryUnsafe, check_socket_directory, listener_from_socket,
    open_unix_listener, refuse_if_agent_answers,
)
from ._service import Service
from ._statecheck import EXIT_STATE_DAMAGED, StateDamaged, check_state, clean_orphans
from ._store import SchemaTooNew, Store
from ._supervisor import Supervisor
from ._systemd import SocketActivationError, SystemdNotifier, take_listen_socket
from .executors import Executor, build_executors

log = structlog.get_logger("labrun.agent")

# Free pages kept in the database (and written WAL), so commits on a full disk reuse space (Store.reserve_space).
DATABASE_RESERVE_BYTES = 8 * 1024 * 1024
# In-flight requests (log followers, waits) get this long after a shutdown signal.
SHUTDOWN_GRACE_SECONDS = 2.0


class StateDirLocked(Exception):
    pass


def _lock_state_dir(state_dir: Path, system: bool):
    # Root's alone; a root agent's runs reach their own (0700) directories through it by path, so it is 0711.
    agent_dir(state_dir, traversable=True)
    lock = open(state_dir / "agent.lock", "a+", opener=lambda path, flags: os.open(path, flags, 0o600))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StateDirLocked(f"another labrund is using the state directory {state_dir}") from None
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    except OSError as exc:   # a full disk: the lock is what matters, the pid in it is for people
        log.warning("state.lock.pid_not_written", error=str(exc))
    return lock


async def run_agent(config: AgentConfig, *, executors: dict[str, Executor] | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the agent until SIGTERM or SIGINT (or cancellation).

    Args:
        executors: by target kind; default: every registered kind (``executors.FACTORIES``).
    """
    activated = take_listen_socket()
    if activated is not None:
        # The socket unit owns the path, its mode and group; runs are told where it is.
        config.socket = Path(activated.getsockname())
    notifier = SystemdNotifier()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        lock = _lock_state_dir(config.state_dir, config.system)
        try:
            check_state(config.state_dir)
            faults = Faults(config.state_dir / "reserve")
            store = await _open_store(config.state_dir / "state.db", faults, signals)
        except BaseException:
            lock.close()
            raise
        if store is None:
            lock.close()
            return
        faults.keep_reserve()
        try:
            store.reserve_space(DATABASE_RESERVE_BYTES)
        except sqlite3.OperationalError as exc:
            if not is_disk_error(exc):
                raise
            faults.report("store", exc)
        store.before_commit = faults.make_room
        store.on_commit_failed = lambda exc: faults.report("store", exc) if is_disk_error(exc) else None
        clean_orphans(config.state_dir, lambda run_id: store.get_run(run_id) is not None)
        if executors is None:
            executors = build_executors(config, store)
        try:
            async with trio.open_nursery() as writer:
                # The store's single writer (group commits) outlives every task that writes.
                await writer.start(store.writer)
                await _serve(config, store, faults, executors, signals, task_status, activated, notifier)
                writer.cancel_scope.cancel()
        finally:
            notifier.close()
            with trio.move_on_after(5, shield=True):
                for executor in executors.values():
                    await executor.aclose()
            store.close()
            lock.close()
    log.info("agent.stopped")


async def _open_store(path: Path, faults: Faults, signals) -> Store | None:
    """Open the database; on a full disk give up the reserve and retry until it opens (never a crash).

    Returns None if a stop signal came while waiting for space.
    """
    try:
        return Store(path)
    except sqlite3.OperationalError as exc:
        if not is_disk_error(exc):
            raise
        faults.report("store", exc)
    store = None
    async with trio.open_nursery() as nursery:
        async def stop_on_signal():
            async for _ in signals:
                nursery.cancel_scope.cancel()

        nursery.start_soon(stop_on_signal)
        store = await faults.retry("store", Store, path)
        nursery.cancel_scope.cancel()
    return store


def status_line(store: Store, supervisor: Supervisor) -> str:
    """The one-line summary systemd shows (``systemctl status labrund``)."""
    counts = store.counts_by_status()
    active = sum(n for status, n in counts.items() if status != QUEUED and status not in TERMINAL)
    line = f"{active} active, {counts.get(QUEUED, 0)} queued"
    return line + ", draining (labrun agent resume starts runs again)" if supervisor.draining else line


async def _serve(config: AgentConfig, store: Store, faults: Faults, executors: dict[str, Executor], signals,
                 task_status, activated, notifier: SystemdNotifier) -> None:
    capacity = discover_capacity(config.resources)
    supervisor = Supervisor(config, store, capacity, executors, faults)
    events = EventLog(store, buffer=config.subscriber_buffer, replay_max=config.replay_max)
    hub = HubSender(config.hub, store, events) if config.hub is not None else None
    run_files = RunFiles(config, store, supervisor)
    limits = Limits(config.limits)
    service = Service(config, store, supervisor, events, hub, run_files, limits=limits)
    mlflow = Mlflow(config, store, events, supervisor)
    service.mlflow = supervisor.launches.mlflow = mlflow
    if activated is None:
        # Under socket activation the path is systemd's, and connecting to it would only queue.
        check_socket_directory(config.socket, system=config.system)
        refuse_if_agent_answers(config.socket)
    socket_inode = None
    try:
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as nursery:
                # Recover first: a client that can connect sees the runs as they really are.
                await nursery.start(supervisor.run)
                if hub is not None:
                    await nursery.start(hub.run)
                await nursery.start(faults.watch, partial(_probe_disk, config.state_dir, store))
                await nursery.start(mlflow.run)

                def delivered() -> int | None:
                    """Retention keeps what the hub or the MLflow mirror has not taken yet."""
                    cursors = [hub.delivered if hub is not None else None,
                               mlflow.mirror.delivered if mlflow.mirror is not None else None]
                    return min((c for c in cursors if c is not None), default=None)

                await nursery.start(events.retain, config.retention_days, delivered)
                await nursery.start(run_files.retain)
                if activated is not None:
                    listener = listener_from_socket(activated)
                else:
                    listener = await open_unix_listener(config.socket, system=config.system, group=config.socket_group)
                    socket_inode = os.stat(config.socket).st_ino
                handler = ConnectionHandler(config, service, limits, handlers)
                await nursery.start(partial(trio.serve_listeners, handler, [listener], handler_nursery=handlers))
                _lifecycle_event(store, faults, "agent.started", {"version": __version__, "pid": os.getpid()})
                log.info("agent.started", socket=str(config.socket), state_dir=str(config.state_dir),
                         version=__version__, cpus=capacity.cpus, gpus=list(capacity.gpus))
                await nursery.start(notifier.run_watchdog, partial(status_line, store, supervisor))
                task_status.started()
                notifier.notify(ready=1, status=status_line(store, supervisor))
                async for signum in signals:
                    log.info("agent.stopping", signal=signal.Signals(signum).name)
                    break
                notifier.notify(stopping=1, status="stopping; runs keep running")
                _lifecycle_event(store, faults, "agent.stopping", {"pid": os.getpid()})
                nursery.cancel_scope.cancel()
            handlers.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE_SECONDS
    finally:
        try:
            if socket_inode is not None and os.stat(config.socket).st_ino == socket_inode:
                config.socket.unlink()
        except FileNotFoundError:
            pass


def _probe_disk(state_dir: Path, store: Store) -> None:
    """A small file write and a database write where the agent keeps its state: both pass once space is back."""
    probe = state_dir / ".disk-probe"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(64 * 1024))
            f.flush()
            os.fsync(f.fileno())
    finally:
        probe.unlink(missing_ok=True)
    store.set_meta("disk_probe", time.time())
    if store.commit_error is not None:
        raise store.commit_error   # (the write above only joined the batch that cannot commit yet)


def _lifecycle_event(store: Store, faults: Faults, type: str, data: dict) -> None:
    """The agent's own events are worth a line, not a crash, when the disk is full."""
    try:
        store.add_event(type, data)
    except Exception as exc:
        if not is_disk_error(exc):
            raise
        faults.report("store", exc)


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
    raise_fd_limit()
    tune_malloc()
    refusals = []
    code = 0
    try:
        trio.run(run_agent, config)
    except* (AgentAlreadyRunning, SocketDirectoryUnsafe, StateDirLocked, SchemaTooNew, SocketActivationError) as group:
        refusals, code = group.exceptions, 1
    except* StateDamaged as group:
        refusals, code = group.exceptions, EXIT_STATE_DAMAGED
    for exc in refusals:
        print(f"labrund: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
