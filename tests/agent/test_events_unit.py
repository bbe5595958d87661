"""The event log's pure parts, retention, and the hub's retry schedule on trio's MockClock."""

import json

import httpx
import pytest
import trio

from labrun.agent._config import ConfigError, load_config
from labrun.agent._events import EventFilter, EventLog, Subscription
from labrun.agent._hub import HubConfig, HubSender, to_cloudevent
from labrun.agent._store import Store


def event(seq, type="run.queued", run_id="r", experiment="e", user="u"):
    return {"seq": seq, "id": f"id{seq}", "time": 0.0, "type": type, "run_id": run_id, "experiment": experiment,
            "user": user, "data": {}}


class TestSubscription:
    def test_overflow_records_the_first_missed_and_stops_taking(self):
        sub = Subscription(EventFilter(), capacity=2)
        for seq in (1, 2, 3, 4):
            sub.offer(event(seq))
        assert [e["seq"] for e in sub.buffer] == [1, 2] and sub.first_missed == 3

    def test_filters_apply_before_the_buffer(self):
        sub = Subscription(EventFilter(run_id="a", types=frozenset({"run.completed"})), capacity=1)
        sub.offer(event(1, run_id="b", type="run.completed"))
        sub.offer(event(2, run_id="a", type="run.queued"))
        sub.offer(event(3, run_id="a", type="run.completed"))
        assert [e["seq"] for e in sub.buffer] == [3] and sub.first_missed is None


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "state.db")
    yield store
    store.close()


def test_retention_never_deletes_past_the_hub_cursor(store):
    for _ in range(5):
        store.add_event("agent.started")
    assert store.delete_events(before_time=1e12, up_to_seq=3) == 3
    assert [e["seq"] for e in store.events_since(0)] == [4, 5]
    store.add_event("agent.started")
    assert store.last_seq() == 6   # AUTOINCREMENT: never reused


def test_store_publishes_only_after_commit(store):
    seen = []
    store.on_events = seen.extend
    store.add_event("agent.started", {"pid": 1})
    assert [(e["seq"], e["type"], e["data"]) for e in seen] == [(1, "agent.started", {"pid": 1})]


def test_cloudevent_shape():
    ce = to_cloudevent({**event(7, "run.completed"), "time": 0.0, "data": {"status": "Completed"}}, "labrun://h")
    assert ce == {"specversion": "1.0", "id": "id7", "source": "labrun://h", "type": "org.labrun.run.completed",
                  "time": "1970-01-01T00:00:00Z", "subject": "r", "datacontenttype": "application/json",
                  "sequence": "7", "data": {"seq": 7, "run_id": "r", "experiment": "e", "user": "u",
                                            "status": "Completed"}}


@pytest.mark.parametrize("text, message", [
    ("[hub]\ntoken_file = 'x'", "'url' is required"),
    ("[hub]\nurl = 'https://h'\nbatch_max = 0", "hub.batch_max: must be positive"),
    ("[hub]\nurl = 'https://h'\nretries = 3", "unknown key 'retries'"),
    ("[events]\nsubscriber_buffer = 0", "at least 1"),
    ("[events]\nreplay_max = 0", "events.replay_max: must be at least 1"),
])
def test_hub_config_errors(tmp_path, text, message):
    path = tmp_path / "a.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


async def test_backoff_doubles_to_the_cap_then_a_4xx_pauses(store, autojump_clock, nursery, monkeypatch):
    monkeypatch.setattr("random.uniform", lambda a, b: 1.0)   # no jitter: exact times
    answers = [503, 503, 503, 503, 503, 401, 200]
    attempts = []

    def handler(request):
        attempts.append((trio.current_time(), len(json.loads(request.content))))
        return httpx.Response(answers[len(attempts) - 1])

    log = EventLog(store)
    store.add_event("agent.started")
    config = HubConfig(url="http://hub/", retry_initial_seconds=1, retry_max_seconds=4, pause_seconds=100)
    sender = HubSender(config, store, log, transport=httpx.MockTransport(handler))
    start = trio.current_time()
    await nursery.start(sender.run)
    while sender.delivered != 1:
        await trio.sleep(1)
    gaps = [round(b[0] - a[0], 3) for a, b in zip(attempts, attempts[1:])]
    assert gaps == [1, 2, 4, 4, 4, 100]
    assert sender.last_error is None and attempts[0][0] == start
    assert store.get_meta("hub_cursor:http://hub/") == 1


def test_events_since_filters_in_the_database(store):
    for run_id, experiment, type in (("a", "x", "run.queued"), ("b", "y", "run.queued"), ("a", "x", "run.completed")):
        store._event(type, run_id=run_id, experiment=experiment, user="u")
    assert [e["seq"] for e in store.events_since(0, experiment="x")] == [1, 3]
    assert [e["seq"] for e in store.events_since(0, types=["run.completed", "other"])] == [3]
    assert [e["seq"] for e in store.events_since(0, run_id="a", types=["run.queued"], user="u")] == [1]
    assert store.events_since(0, user="v") == [] and store.events_since(0, types=[]) == []
    assert [e["seq"] for e in store.events_since(1, 1)] == [2]

