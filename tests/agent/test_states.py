import pytest

from labrun.agent._states import EVENT_TYPES, InvalidTransition, can_transition, check_transition
from labrun.protocol import STATUSES, TERMINAL


def test_happy_path():
    path = ["Queued", "Preparing", "Starting", "Running", "Finalizing", "Completed"]
    for old, new in zip(path, path[1:]):
        check_transition(old, new)


def test_terminal_states_are_final():
    for status in TERMINAL:
        assert not any(can_transition(status, s) for s in STATUSES)


def test_every_non_terminal_status_can_be_canceled():
    for status in set(STATUSES) - TERMINAL - {"CancelRequested"}:
        assert can_transition(status, "CancelRequested") or can_transition(status, "Canceled")
    check_transition("CancelRequested", "Canceled")


def test_impossible_transition_raises():
    with pytest.raises(InvalidTransition, match="from Completed to Running"):
        check_transition("Completed", "Running")


def test_event_names_are_past_tense_dotted():
    assert EVENT_TYPES["Running"] == "run.started" and EVENT_TYPES["Canceled"] == "run.canceled"
    assert set(EVENT_TYPES) == set(STATUSES)


def test_outcome_of_each_way_a_run_ends():
    from labrun.agent._states import ExitResult, outcome

    assert outcome(ExitResult(exit_code=0)) == ("Completed", None, None)
    assert outcome(ExitResult(exit_code=3)) == ("Failed", "exit_code", "exited with code 3")
    assert outcome(ExitResult(signal=9)) == ("Failed", "signal", "killed by signal 9 (SIGKILL)")
    assert outcome(ExitResult(signal=9, memory_exceeded=True), memory=64 << 20).reason == "memory_limit_exceeded"
    assert "64" in outcome(ExitResult(signal=9, memory_exceeded=True), memory=64 << 20).error
    # A canceled run is Canceled whatever its process did, even exiting 0 just as the cancel came.
    assert outcome(ExitResult(exit_code=0), cancel_reason="canceled") == ("Canceled", "canceled", "canceled")
    limit = outcome(ExitResult(signal=15), cancel_reason="max_run_duration_exceeded")
    assert limit.status == "Canceled" and "max_run_duration_seconds" in limit.error
    assert outcome(None, cancel_reason="canceled").status == "Canceled"
    assert outcome(None).status == "Failed"
