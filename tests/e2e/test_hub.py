"""Delivery to the upstream hub: a real HTTP server on 127.0.0.1 that goes down, fails, and comes back."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from labrun import Experiment, ScriptRunConfig
from tests.e2e.test_agent import wait_until


class Hub:
    """Records CloudEvents batches; ``mode`` is "ok", "unavailable" (503) or "unauthorized" (401)."""

    def __init__(self):
        self.received: list[dict] = []
        self.requests = 0
        self.mode = "ok"
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self.server = None
        self.port = 0
        self.up()

    def up(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with hub.lock:
                    hub.requests += 1
                    hub.headers.append(dict(self.headers))
                    if hub.mode == "ok":
                        hub.received.extend(json.loads(body))
                        code = 200
                    else:
                        code = 503 if hub.mode == "unavailable" else 401
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def down(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/v1/events"

    def seqs(self):
        with self.lock:
            return [int(e["sequence"]) for e in self.received]


@pytest.fixture
def hub():
    hub = Hub()
    yield hub
    hub.down()


def hub_agent(make_agent, hub, tmp_path):
    token = tmp_path / "hub.token"
    token.write_text("s3cret-token\n")
    return make_agent(f'[hub]\nurl = "{hub.url}"\ntoken_file = "{token}"\nbatch_max = 4\n'
                      "retry_initial_seconds = 0.05\nretry_max_seconds = 0.3\npause_seconds = 0.5\n")


def last_seq(agent):
    return agent.workspace()._call("status")["events"]["last_seq"]


def everything_arrived(agent, hub):
    target = last_seq(agent)
    wait_until(lambda: hub.seqs() and hub.seqs()[-1] >= target, timeout=30, what=f"the hub to reach seq {target}")
    seqs = hub.seqs()
    assert seqs == list(range(1, len(seqs) + 1)), "every event, in order, none twice"


def run_some(agent, source, n=2):
    experiment = Experiment(agent.workspace(), "hub")
    for _ in range(n):
        experiment.submit(ScriptRunConfig(str(source), command=["true"])).wait_for_completion()


def test_every_event_arrives_as_cloudevents(make_agent, hub, source, tmp_path):
    agent = hub_agent(make_agent, hub, tmp_path)
    run_some(agent, source)
    everything_arrived(agent, hub)
    event = next(e for e in hub.received if e["type"] == "org.labrun.run.completed")
    assert event["specversion"] == "1.0" and event["source"].startswith("labrun://")
    assert event["data"]["status"] == "Completed" and event["data"]["exit_code"] == 0 and event["subject"]
    assert hub.received[0]["type"] == "org.labrun.agent.started"
    assert all(h["Content-Type"] == "application/cloudevents-batch+json" for h in hub.headers)
    assert all(h["Authorization"] == "Bearer s3cret-token" for h in hub.headers)
    assert len({e["id"] for e in hub.received}) == len(hub.received)
    status = agent.workspace()._call("status")["hub"]
    assert status["backlog"] == 0 and status["last_error"] is None


def test_outage_then_errors_lose_nothing(make_agent, hub, source, tmp_path):
    agent = hub_agent(make_agent, hub, tmp_path)
    run_some(agent, source, 1)
    everything_arrived(agent, hub)
    hub.down()
    run_some(agent, source, 2)   # the agent keeps running jobs while the hub is away
    wait_until(lambda: agent.workspace()._call("status")["hub"]["last_error"] is not None, what="an error")
    status = agent.workspace()._call("status")["hub"]
    assert status["state"] == "retrying" and status["backlog"] > 0
    assert "hub" in agent.cli("status", check=True).stdout
    hub.mode = "unavailable"
    before = hub.requests
    hub.up()
    run_some(agent, source, 1)
    wait_until(lambda: hub.requests >= before + 3, what="retries against 503")
    wait_until(lambda: "HTTP 503" in agent.workspace()._call("status")["hub"]["last_error"], what="the 503")
    hub.mode = "ok"
    everything_arrived(agent, hub)


def test_unauthorized_pauses_and_drops_nothing(make_agent, hub, source, tmp_path):
    hub.mode = "unauthorized"
    agent = hub_agent(make_agent, hub, tmp_path)
    run_some(agent, source, 1)
    wait_until(lambda: (agent.workspace()._call("status")["hub"] or {}).get("state") == "paused", what="a pause")
    assert "HTTP 401" in agent.workspace()._call("status")["hub"]["last_error"]
    assert "hub.delivery.failed" in agent.log_path.read_text()
    hub.mode = "ok"
    everything_arrived(agent, hub)
    assert agent.workspace()._call("status")["hub"]["last_error"] is None


def test_agent_restart_mid_delivery_resumes_from_the_cursor(make_agent, hub, source, tmp_path):
    agent = hub_agent(make_agent, hub, tmp_path)
    run_some(agent, source, 1)
    everything_arrived(agent, hub)
    hub.down()
    run_some(agent, source, 2)
    agent.restart()
    hub.up()
    run_some(agent, source, 1)
    everything_arrived(agent, hub)
    types = [e["type"] for e in hub.received]
    assert "org.labrun.agent.stopping" in types and types.count("org.labrun.agent.started") == 2


def test_bad_hub_config_is_refused(make_agent):
    agent = make_agent('[hub]\nurl = "ftp://nowhere"\n', start=False)
    with pytest.raises(RuntimeError, match="hub.url: must be an http"):
        agent.start()
