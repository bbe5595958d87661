"""The run state machine: which status may follow which, and the event each transition emits.

Pure: no I/O. The supervisor asks ``check_transition`` before every store update, so
an impossible transition is a bug caught at once rather than a corrupt history.
"""

from __future__ import annotations

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
