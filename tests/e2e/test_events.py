"""The event log end to end: replay, cursors, filters, live follow, and a slow subscriber's gap."""

import json
import subprocess
import sys

import pytest

from labrun import Experiment, ScriptRunConfig
from labrun._connection import AgentConnection
from tests.e2e.test_agent import hello, raw_connect, read_frame  # noqa: F401
from labrun.protocol import pack_frame

RUN_TYPES = ["run.queued", "run.preparing", "run.starting", "run.started", "run.finalizing", "run.completed"]


def submit(agent, source, command, name="ev"):
    return Experiment(agent.workspace(), name).submit(ScriptRunConfig(str(source), command=command))


def test_replay_from_zero_and_resume_from_a_cursor(agent, source):
    run = submit(agent, source, ["true"])
    run.wait_for_completion()
    workspace = agent.workspace()
    events = list(workspace.watch(0, follow=False))
    assert events[0]["type"] == "agent.started"
    assert [e["seq"] for e in events] == list(range(events[0]["seq"], events[0]["seq"] + len(events)))
    mine = [e for e in events if e["run_id"] == run.id]
    assert [e["type"] for e in mine] == RUN_TYPES
    assert mine[-1]["data"]["exit_code"] == 0 and mine[0]["user"] == "root" and mine[0]["experiment"] == "ev"
    assert len({e["id"] for e in events}) == len(events)
    cursor = mine[2]["seq"]
    assert list(workspace.watch(cursor, follow=False)) == [e for e in events if e["seq"] > cursor]


def test_seq_is_monotonic_across_restarts(agent, source):
    submit(agent, source, ["true"]).wait_for_completion()
    before = list(agent.workspace().watch(0, follow=False))
    agent.restart()
    after = list(agent.workspace().watch(before[-1]["seq"], follow=False))
    assert [e["type"] for e in after] == ["agent.stopping", "agent.started"]
    assert after[0]["seq"] == before[-1]["seq"] + 1


def test_filters(agent, source):
    a = submit(agent, source, ["true"], name="one")
    b = submit(agent, source, ["false"], name="two")
    a.wait_for_completion()
    b.wait_for_completion(raise_on_error=False)
    workspace = agent.workspace()
    assert {e["run_id"] for e in workspace.watch(0, run_id=b.id, follow=False)} == {b.id}
    assert {e["experiment"] for e in workspace.watch(0, experiment="one", follow=False)} == {"one"}
    ended = list(workspace.watch(0, types=["run.completed", "run.failed"], follow=False))
    # The two runs run at once: either may end first.
    assert sorted((e["type"], e["run_id"]) for e in ended) == [("run.completed", a.id), ("run.failed", b.id)]


def test_cli_follows_live_events(agent, source):
    last = list(agent.workspace().watch(0, follow=False))[-1]["seq"]
    follower = subprocess.Popen([sys.executable, "-m", "labrun.cli", "events", "--follow", "--jsonl", "--since",
                                 str(last)], env=agent.env, stdout=subprocess.PIPE, text=True)
    try:
        run = submit(agent, source, ["true"])
        seen = []
        for line in follower.stdout:
            seen.append(json.loads(line))
            if seen[-1]["type"] == "run.completed":
                break
        assert [e["type"] for e in seen] == RUN_TYPES and {e["run_id"] for e in seen} == {run.id}
    finally:
        follower.terminate()
        follower.wait()
        follower.stdout.close()
    human = agent.cli("events", "--run", run.id, check=True).stdout.splitlines()
    assert len(human) == 6 and "run.completed" in human[-1] and "exit_code=0" in human[-1]


@pytest.mark.slow
def test_slow_subscriber_gets_a_gap_and_resumes_exactly(make_agent, raw_connect):
    """A subscriber that stops reading is cut off with a gap, never blocks the agent, and resumes from it."""
    agent = make_agent("[events]\nsubscriber_buffer = 5\n[resources]\nmax_concurrent_runs = 1\n")
    slow = raw_connect(agent)
    hello(slow)
    slow.sendall(pack_frame({"id": 1, "op": "watch", "args": {"since": None, "follow": True}}))
    spec = {"experiment": "flood", "command": ["sleep", "60"], "snapshot": {"files": []}}
    with AgentConnection(agent.socket) as connection:
        blocker = connection.call("submit", spec=spec)
        # Each queued-then-canceled run is two events; enough to fill the socket and then the buffer.
        for _ in range(800):
            run = connection.call("submit", spec=spec)
            connection.call("cancel", run_id=run["run_id"])
        connection.call("cancel", run_id=blocker["run_id"])
        connection.call("wait", run_id=blocker["run_id"])   # its last event is in before the histories are read
        assert connection.call("status")["pid"] == agent.process.pid   # the agent kept serving
    received, gap = [], None
    while True:
        frame = read_frame(slow)
        if frame.get("end"):
            break
        if "gap" in frame["item"]:
            gap = frame["item"]["gap"]
        else:
            received.append(frame["item"]["event"])
    assert gap is not None and received
    assert gap["last_delivered"] == received[-1]["seq"] and gap["first_missed"] > gap["last_delivered"]
    seqs = [e["seq"] for e in received]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    everything = list(agent.workspace().watch(0, follow=False))
    resumed = list(agent.workspace().watch(gap["last_delivered"], follow=False))
    assert resumed == [e for e in everything if e["seq"] > gap["last_delivered"]]
    # The client iterator resumes by itself: it sees every event, gap or not.
    assert [e["seq"] for e in agent.workspace().watch(seqs[0] - 1, follow=False)] == \
        [e["seq"] for e in everything if e["seq"] >= seqs[0]]


def test_one_request_replays_at_most_replay_max_and_the_iterator_resumes(make_agent, raw_connect, source):
    """A replay is served in bounded requests: each ends with a gap naming where to resume, and the Python
    iterator resumes from it, so a client of any history gets all of it, in order, once."""
    agent = make_agent("[events]\nreplay_max = 5\n")
    runs = [submit(agent, source, ["true"], name=name) for name in ("one", "two", "one")]
    for run in runs:
        run.wait_for_completion()
    connection = raw_connect(agent)
    hello(connection)
    connection.sendall(pack_frame({"id": 1, "op": "watch", "args": {"since": 0, "follow": True}}))
    items = []
    while not (frame := read_frame(connection)).get("end"):
        items.append(frame["item"])
    assert [list(item) for item in items] == [["event"]] * 5 + [["gap"]]
    gap = items[-1]["gap"]
    assert gap == {"first_missed": items[4]["event"]["seq"] + 1, "last_delivered": items[4]["event"]["seq"],
                   "reason": "replay_limit"}
    everything = list(agent.workspace().watch(0, follow=False))
    seqs = [e["seq"] for e in everything]
    assert len(everything) == 1 + 6 * len(runs) and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # Filtered replays are bounded the same way (the filter is applied before the count).
    ones = list(agent.workspace().watch(0, experiment="one", follow=False))
    assert ones == [e for e in everything if e["experiment"] == "one"] and len(ones) == 12
    ended = list(agent.workspace().watch(0, types=["run.completed"], follow=False))
    assert sorted(e["run_id"] for e in ended) == sorted(run.id for run in runs)
