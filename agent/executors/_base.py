"""The executor interface: how a run of one target kind is admitted, planned, started, awaited, stopped and
recovered after an agent restart.

Each kind is one module (``_local``, ``_docker``, ``_fake``; more register in ``_registry``).
The supervisor owns a run's lifecycle and calls only this interface; it knows no kind by name.

::

    admit(spec, target)            at submit: refuse (BadRequest) what this kind cannot run
    prepare(preparation)           in Preparing: plan the launch (environment, argv, ranks, container)
    start(launch)    -> handle     in Starting: the handle is persisted before the run is Running
    wait(handle)     -> ExitResult until the run's processes have ended
    stop(handle, grace)            SIGTERM (or the kind's equivalent), grace, then kill
    recover(handle)  -> Live | Ended | Lost   after an agent restart, for each run still active
    start_array(launches, throttle) -> handles   (``arrays`` kinds) an array's members as one job of the kind's own
    stopping_together(handles)     the runs of an array canceled as a whole: their ``stop`` may be one command
    reconcile(owned)               at start: clean up what no active run owns (orphans)
    aclose()                       at the agent's exit: the executor's own resources, never runs

Handles are typed and versioned (``Handle`` subclasses, one per kind). The store keeps
``handle.to_store()``; ``load_handle`` reads it back, upgrading older versions or refusing
unknown ones, so an agent never misreads a handle another version wrote.

Cancellation: ``wait`` is cancelled when the run is killed or the agent stops; neither
kills the run by itself. Killing is ``stop`` alone, so "cancel a run" and "stop the agent"
stay different things, and a stopped agent leaves its runs running for ``recover``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from labrun.protocol import BadRequest

from .._asuser import make_private_dir
from .._states import ExitResult

if TYPE_CHECKING:
    from .._asuser import Credentials
    from .._config import TargetConfig
    from .._launch import LaunchPlanner
    from .._model import RunRecord
    from .._rundir import RunDir
    from .._scheduler import Allocation

__all__ = ["Capabilities", "Ended", "Executor", "ExitResult", "Handle", "HandleError", "LaunchSpec", "Live", "Lost",
           "Preparation", "Rank", "Recovery", "StartFailed"]


@dataclass(frozen=True)
class Capabilities:
    """What a kind of executor can do; the supervisor refuses at submit what it cannot."""

    gpus: bool = False            # hands out the run's GPUs
    distributed: bool = False     # PyTorch / MPI / TensorFlow process groups
    containers: bool = False      # runs in an image
    logs: str = "run_dir"         # where logs live: "run_dir" (the agent reads them), or "remote"
    counted_locally: bool = True  # the local scheduler counts its CPUs, memory and GPUs
    outlives_agent: bool = False  # its runs keep running while the agent is down, and recover() reattaches
    # The runs wait in a queue of the executor's own (a Slurm cluster's): after Preparing a run is Queued
    # there, and ``wait(handle, progress)`` reports each change: ``progress(status, waiting)``, where
    # ``waiting`` says why a Queued run waits (``{"reason": ..., ...}``, shown by ``labrun ls``).
    own_queue: bool = False
    # An array's members start together as one job of the executor's own (a Slurm job array, ``start_array``),
    # which keeps the array's ``%N`` limit itself.
    arrays: bool = False


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
    run_dir: "RunDir | None" = None
    slurm: dict | None = None       # Slurm runs: {"job": SlurmJob, "settings": SlurmSettings}
    # An empty snapshot left to the run's own process to make (``plan(..., empty_snapshot_by_run=True)``):
    # this ``snapshot/`` and its ``outputs/``, made as the run's user before the run starts.
    empty_snapshot: Path | None = None


@dataclass
class Preparation:
    """What ``prepare`` gets: the run, its allocation and token, its directory, and the shared planner."""

    record: "RunRecord"
    allocation: "Allocation"
    token: str
    run_dir: "RunDir"
    target: "TargetConfig | None"
    planner: "LaunchPlanner"


class StartFailed(Exception):
    """The run could not be started (command not found, not executable, image missing).

    ``reason`` is the run's failure reason.
    """

    def __init__(self, message: str, reason: str = "start_failed"):
        super().__init__(message)
        self.reason = reason


class HandleError(Exception):
    """A persisted handle this agent cannot read (another kind, or a newer version)."""


@dataclass(frozen=True)
class Handle:
    """An executor's persisted handle. Subclasses are frozen dataclasses with ``kind`` and ``VERSION`` (1 unless
    they set it).

    Bump ``VERSION`` when the fields change, and teach ``upgrade`` to read the older shapes.
    """

    kind: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    @property
    def pid(self) -> int | None:
        """The process id shown to clients, if the run has one on this machine."""
        return None

    def to_store(self) -> dict:
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"kind": self.kind, "version": self.VERSION, **data}

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        """Fields of an older ``version`` of this handle in today's shape; refuse by default."""
        raise HandleError(f"a {cls.kind} handle of version {version} cannot be read by this agent "
                          f"(it reads version {cls.VERSION})")

    @classmethod
    def from_store(cls, data: dict) -> "Handle":
        version = data.get("version", 0)
        if data.get("kind", cls.kind) != cls.kind:
            raise HandleError(f"a {data.get('kind')!r} handle given to the {cls.kind} executor")
        if version > cls.VERSION:
            raise HandleError(f"a {cls.kind} handle of version {version} is newer than this agent "
                              f"(it reads up to version {cls.VERSION})")
        fields = {f.name for f in dataclasses.fields(cls)}
        if version < cls.VERSION:
            data = cls.upgrade(data, version)
        values = {k: v for k, v in data.items() if k in fields}
        for f in dataclasses.fields(cls):
            if isinstance(values.get(f.name), list):
                values[f.name] = tuple(values[f.name])
        try:
            return cls(**values)
        except TypeError as exc:
            raise HandleError(f"a {cls.kind} handle is missing fields: {exc}") from None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Live:
    """The run is still running: supervise it through ``handle`` (maybe refreshed by ``recover``)."""

    handle: Handle


@dataclass(frozen=True)
class Ended:
    """The run ended while no agent watched it; this is how."""

    result: ExitResult


@dataclass(frozen=True)
class Lost:
    """Nothing of the run is left and no exit status was recorded (a reboot, a removed container)."""

    why: str


Recovery = Live | Ended | Lost


class Executor:
    """The base every executor derives from: defaults for the optional parts, and the contract in docstrings."""

    kind: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    handle_type: ClassVar[type[Handle]] = Handle

    def admit(self, spec: dict, target: "TargetConfig | None") -> None:
        """Refuse at submit (``BadRequest`` naming the field) what this kind cannot run."""
        if spec.get("distributed") is not None and not self.capabilities.distributed:
            refuse("distributed", f"distributed runs on {self.kind} targets are not supported yet")
        if spec["resources"].get("gpus") and not self.capabilities.gpus:
            refuse("resources", f"{self.kind} targets cannot hand out GPUs")

    def make_run_dir(self, target: "TargetConfig | None", run_dir: "RunDir",
                     creds: "Credentials | None" = None) -> None:
        """Create the run's directory at submit, as ``creds``' private directory: by default in the agent's
        state directory."""
        make_private_dir(run_dir.root.parent, run_dir.run_id, creds)

    async def prepare(self, preparation: Preparation) -> LaunchSpec:
        """Plan the launch: by default the run's processes on this machine, as the planner makes them."""
        return await preparation.planner.plan(preparation)

    async def start(self, launch: LaunchSpec) -> Handle:
        raise NotImplementedError

    async def start_array(self, launches: list[LaunchSpec], throttle: int) -> list[Handle]:
        """(Kinds with the ``arrays`` capability.) Start members of one array as one job, at most ``throttle``
        (0: all) at once; their handles, in the order of ``launches``."""
        raise NotImplementedError

    async def wait(self, handle: Handle) -> ExitResult:
        raise NotImplementedError

    async def stop(self, handle: Handle, grace: float) -> None:
        raise NotImplementedError

    def stopping_together(self, handles: list[Handle]) -> None:
        """The runs of ``handles`` (an array canceled as a whole) are about to be stopped, each with ``stop``: a
        kind that stops them all with one command may do so at the first. By default each is stopped alone."""

    def recovering(self, handles: list[Handle]) -> None:
        """At start, before any ``recover``: the handles of every run of this kind being recovered."""

    async def recover(self, handle: Handle) -> Recovery:
        """After an agent restart: reattach (``Live``), report how it ended (``Ended``), or ``Lost``."""
        return Lost("this executor cannot reattach to runs")

    async def reconcile(self, owned: list[Handle]) -> None:
        """At start, once every active run's handle is known: clean up what no run owns (orphans)."""

    def load_handle(self, data: dict) -> Handle:
        return self.handle_type.from_store(data)

    async def aclose(self) -> None:
        """Release the executor's own resources (connections); never touches runs."""


def agent_id(state_dir) -> str:
    """This agent's name among others on the machine (for its containers and cgroups): from its state directory."""
    return hashlib.sha256(str(state_dir).encode()).hexdigest()[:16]


def refuse(field: str, message: str):
    raise BadRequest(f"spec.{field}: {message}", details={"field": f"spec.{field}"})
