"""The run state machine: which status may follow which, the event each transition emits, and how a run
ends (``outcome``: its final status, reason and message from how its process ended).

Pure: no I/O. The supervisor asks ``check_transition`` before every store update, so
an impossible transition is a bug caught at once rather than a corrupt history.
"""

from __future__ import annotations

import signal as signals
from dataclasses import dataclass
from typing import NamedTuple

from labrun.protocol import format_memory
from labrun.protocol._statuses import (
    CANCEL_REQUESTED, CANCELED, COMPLETED, FAILED, FINALIZING, PREPARING, QUEUED, RUNNING, STARTING, TERMINAL,
)

_NEXT: dict[str, frozenset[str]] = {
    # Queued -> Starting: a Slurm run leaves the cluster's queue (after Preparing, as on Azure ML's clusters).
    QUEUED: frozenset({PREPARING, STARTING, CANCEL_REQUESTED, CANCELED, FAILED}),
    # Back to Queued when an agent restarts and finds a run it had not yet launched, when a Slurm run
    # enters the cluster's queue after Preparing, or when Slurm requeues a started run (preemption).
    PREPARING: frozenset({STARTING, CANCEL_REQUESTED, FAILED, QUEUED}),
    STARTING: frozenset({RUNNING, CANCEL_REQUESTED, FAILED, QUEUED}),
    RUNNING: frozenset({FINALIZING, CANCEL_REQUESTED, FAILED, QUEUED}),
    FINALIZING: frozenset({COMPLETED, FAILED, CANCEL_REQUESTED}),
    CANCEL_REQUESTED: frozenset({CANCELED, FAILED}),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    CANCELED: frozenset(),
}

EVENT_TYPES = {
    QUEUED: "run.queued",
    PREPARING: "run.preparing",
    STARTING: "run.starting",
    RUNNING: "run.started",
    FINALIZING: "run.finalizing",
    CANCEL_REQUESTED: "run.cancel_requested",
    COMPLETED: "run.completed",
    FAILED: "run.failed",
    CANCELED: "run.canceled",
}


class InvalidTransition(Exception):
    pass


def can_transition(old: str, new: str) -> bool:
    return new in _NEXT.get(old, frozenset())


def check_transition(old: str, new: str) -> None:
    if not can_transition(old, new):
        raise InvalidTransition(f"a run cannot go from {old} to {new}")


def is_terminal(status: str) -> bool:
    return status in TERMINAL


@dataclass(frozen=True)
class ExitResult:
    """How a run's process (or container, or job) ended."""

    exit_code: int | None = None
    signal: int | None = None
    memory_exceeded: bool = False   # killed for using more memory than the run asked for
    left_behind: int = 0            # background processes still running when the program ended (then ended)
    # Set by executors that know more than an exit status (Slurm's NODE_FAIL, TIMEOUT...): the run's final
    # status, reason and message. ``started``: the command ran at all.
    status: str | None = None
    reason: str | None = None
    error: str | None = None
    started: bool = True

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Outcome(NamedTuple):
    status: str
    reason: str | None
    error: str | None


def outcome(result: ExitResult | None, *, cancel_reason: str | None = None, memory: int | None = None,
            fail_error: str | None = None) -> Outcome:
    """The final status of a run whose process ended with ``result``.

    Args:
        result: how the process ended; None when it never started or nothing is known.
        cancel_reason: set when the run was canceled (``canceled``, ``max_run_duration_exceeded``): a
            canceled run is ``Canceled`` whatever its process did, even if it ended by itself just then.
        memory: the run's memory request in bytes, for the message of a memory kill.
        fail_error: set when ``Run.fail()`` was called from outside the run (with ``cancel_reason``
            ``failed``): the run is stopped as a cancel is, and ends ``Failed`` with this error.
    """
    if cancel_reason is not None and fail_error is not None:
        return Outcome(FAILED, cancel_reason, fail_error)
    if cancel_reason is not None:
        error = ("canceled: the run exceeded its max_run_duration_seconds"
                 if cancel_reason == "max_run_duration_exceeded" else "canceled")
        return Outcome(CANCELED, cancel_reason, error)
    if result is None:
        return Outcome(FAILED, "agent_error", "the run ended and its exit status is unknown")
    if result.status is not None:
        return Outcome(result.status, result.reason, result.error)
    if result.ok:
        return Outcome(COMPLETED, None, None)
    if result.memory_exceeded:
        asked = format_memory(memory) if memory else "memory"
        return Outcome(FAILED, "memory_limit_exceeded",
                       f"the run used more than the {asked} of memory it asked for and was killed")
    if result.signal is not None:
        try:
            name = signals.Signals(result.signal).name
        except ValueError:
            name = "unknown signal"
        return Outcome(FAILED, "signal", f"killed by signal {result.signal} ({name})")
    return Outcome(FAILED, "exit_code", f"exited with code {result.exit_code}")
