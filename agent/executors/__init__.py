"""Executors: one module per target kind behind one interface (``_base``), registered by kind (``_registry``).

- ``_local``: processes on this machine, each run owned by its shim (``_shim``, a standalone script);
- ``_docker``: containers on this machine's Docker engine;
- ``_slurm``: batch jobs on a Slurm cluster (``_slurm_plan``: its pure parts);
- ``_fake``: in memory, for tests.
"""

from ._base import (
    Capabilities as Capabilities, Ended as Ended, Executor as Executor, ExitResult as ExitResult, Handle as Handle,
    HandleError as HandleError, LaunchSpec as LaunchSpec, Live as Live, Lost as Lost, Preparation as Preparation,
    Rank as Rank, Recovery as Recovery, StartFailed as StartFailed,
)
from ._fake import FakeExecutor as FakeExecutor, FakeMachine as FakeMachine
from ._registry import FACTORIES as FACTORIES, KINDS as KINDS, build_executors as build_executors, kind_for as kind_for

__all__ = ["Capabilities", "Ended", "Executor", "ExitResult", "FACTORIES", "FakeExecutor", "FakeMachine", "Handle",
           "HandleError", "KINDS", "LaunchSpec", "Live", "Lost", "Preparation", "Rank", "Recovery", "StartFailed",
           "build_executors", "kind_for"]
