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
