"""The executor interface: how a run's process (or container) is started, awaited, stopped and abandoned.

Each executor is one module (``_local.py``; Docker and Slurm later). The supervisor
owns the run's lifecycle and calls only these methods. Handles are plain maps the
store persists, so a restarted agent can end what an earlier agent left (``abandon``); reattaching to it
(DESIGN's ``recover``) is not built yet.

Cancellation: ``wait`` is cancelled when the run is killed or the agent stops;
neither kills the process by itself. Killing is ``stop`` alone, so "cancel a run"
and "stop the agent" stay different things.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class ExitResult:
    exit_code: int | None = None
    signal: int | None = None
    memory_exceeded: bool = False   # killed for using more memory than the run asked for
    # Set by executors that know more than an exit status (Slurm's NODE_FAIL, TIMEOUT...): the run's
    # final status, reason and message. ``started``: the command ran at all.
    status: str | None = None
    reason: str | None = None
    error: str | None = None
    started: bool = True

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class Rank:
    """One process of a run: a plain run has one; a distributed run one per rank (or task)."""

    log_path: Path
    env: dict[str, str] = field(default_factory=dict)   # on top of the run's environment
    daemon: bool = False   # a TensorFlow parameter server: stopped when the others are done


@dataclass
class LaunchSpec:
    """Everything an executor needs to start one run's processes."""

    run_id: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    ranks: list[Rank]
    uid: int
    gid: int
    groups: list[int] = field(default_factory=list)
    cores: tuple[int, ...] = ()
    memory: int | None = None       # bytes; enforced when set
    container: dict | None = None   # Docker runs: image, mounts, limits, translated arguments
    slurm: dict | None = None       # Slurm runs: {"job": SlurmJob, "settings": SlurmSettings}


class StartFailed(Exception):
    """The process could not be started (command not found, not executable, image missing).

    ``reason`` is the run's failure reason.
    """

    reason = "start_failed"


class Executor(Protocol):
    name: str

    async def start(self, launch: LaunchSpec) -> dict: ...

    async def wait(self, handle: dict) -> ExitResult: ...

    async def stop(self, handle: dict, grace: float) -> None: ...

    async def abandon(self, handle: dict, grace: float) -> None: ...
