"""Soak: many runs of mixed outcome while the agent is SIGKILLed and restarted at random and the hub flaps.

Checks, at the end:
- every run ends in exactly one terminal state, the one its command asked for, with its real exit code;
- every run's log is complete (the lines its command printed before it ended);
- no run lost or duplicated (each submission carries a unique tag);
- the event log's seq is contiguous, and the hub received every event;
- no leaked processes (each run's command carries a marker) and no leaked file descriptors in the agent.

Writes a Markdown report (``--out``). Run it through ``scripts/soak``: it installs labrun from the checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from labrun import Experiment, ScriptRunConfig, Workspace
from labrun.exceptions import AzureMLException
from labrun.protocol import TERMINAL

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import wait_for_socket  # noqa: E402  (bench/run.py's helper)

# Unique to this soak, so processes of another soak or an earlier, interrupted one never count here.
MARKER = f"labrun-soak-{uuid.uuid4().hex[:12]}"
KINDS = ("ok", "fail", "cancel", "timeout")


class FlappingHub(ThreadingHTTPServer):
    """An event hub that is up for ``period`` seconds, then answers 503 for ``period`` seconds, and so on."""

    def __init__(self, period: float):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.period = period
        self.started = time.monotonic()
        self.received: set[int] = set()
        self.lock = threading.Lock()
        self.refused = 0

    def up(self) -> bool:
        return int((time.monotonic() - self.started) / self.period) % 2 == 0


class HubHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if not self.server.up():
            self.server.refused += 1
            self.send_response(503)
            self.end_headers()
            return
        with self.server.lock:
            self.server.received.update(int(event["sequence"]) for event in json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


class Agent:
    def __init__(self, root: Path, hub_url: str):
        self.root = root
        self.socket = root / "agent.sock"
        (root / "agent.toml").write_text(
            f'[resources]\ncpus = 16\n\n[hub]\nurl = "{hub_url}"\nretry_initial_seconds = 0.2\n'
            f"retry_max_seconds = 1\n")
        self.process = None
        self.kills = 0

    def start(self) -> None:
        log = open(self.root / "agent.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "labrun.agent", "--socket", str(self.socket), "--state-dir",
             str(self.root / "state"), "--config", str(self.root / "agent.toml")],
            stdout=log, stderr=log, env=dict(os.environ, LABRUN_NO_AUTOSTART="1"))
        log.close()
        if not wait_for_socket(self.socket, 60):
            raise RuntimeError("the agent did not come back within 60 s")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.kills += 1

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


def command_for(index: int, kind: str, rng: random.Random) -> tuple[list[str], dict]:
    """The run's command, and what it must end as."""
    nap = rng.choice([0, 0.2, 0.5, 1, 2, 4])
    prologue = f": {MARKER}; echo start-{index};"
    if kind == "ok":
        return ["sh", "-c", f"{prologue} sleep {nap}; echo end-{index}"], {"status": "Completed", "exit_code": 0}
    if kind == "fail":
        code = rng.randint(1, 100)
        return (["sh", "-c", f"{prologue} sleep {nap}; echo end-{index}; exit {code}"],
                {"status": "Failed", "exit_code": code})
    if kind == "cancel":
        return ["sh", "-c", f"{prologue} sleep 60"], {"status": "Canceled"}
    return ["sh", "-c", f"{prologue} sleep 60"], {"status": "Canceled", "reason": "max_run_duration_exceeded"}


def call_until_up(ws: Workspace, action, attempts: int = 600):
    """Run ``action`` (a client call), retrying on a new connection while the agent is down or restarting."""
    for _ in range(attempts):
        try:
            return action()
        except (AzureMLException, OSError, ConnectionError) as exc:
            last = exc
            ws.close()
            time.sleep(0.1)
    raise RuntimeError(f"the agent did not answer: {last}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=20, help="at least this many SIGKILLs of the agent")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.md"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    began = time.monotonic()

    hub = FlappingHub(period=3.0)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    root = Path(tempfile.mkdtemp(prefix="labrun-soak-"))
    source = root / "source"
    source.mkdir()
    agent = Agent(root, f"http://127.0.0.1:{hub.server_address[1]}/events")
    agent.start()
    baseline_fds = agent.fds()
    ws = Workspace(socket=agent.socket)
    experiment = Experiment(ws, "soak")

    stop_killing = threading.Event()

    def killer():
        while not stop_killing.wait(rng.uniform(2, 6)):
            agent.kill()
            time.sleep(rng.uniform(0, 1))
            agent.start()

    kill_thread = threading.Thread(target=killer)
    kill_thread.start()

    expected, to_cancel = {}, []
    for index in range(args.runs):
        kind = KINDS[rng.choices(range(4), weights=[6, 2, 1, 1])[0]]
        argv, outcome = command_for(index, kind, rng)
        config = ScriptRunConfig(str(source), command=argv)
        if kind == "timeout":
            config.run_config.max_run_duration_seconds = 1
        call_until_up(ws, lambda: experiment.submit(config, tags={"soak": str(index)}))
        expected[str(index)] = dict(outcome, kind=kind)
        if kind == "cancel":
            to_cancel.append(index)
        if to_cancel and rng.random() < 0.3:
            victim = to_cancel.pop(0)
            runs = call_until_up(ws, lambda: [r for r in ws.list_runs(experiment="soak", all=True) if r["tags"].get("soak") == str(victim)])
            for run in runs:
                call_until_up(ws, lambda: ws._call("cancel", run_id=run["run_id"]))
        time.sleep(rng.uniform(0, 0.02))
    for victim in to_cancel:
        for run in call_until_up(ws, lambda: [r for r in ws.list_runs(experiment="soak", all=True) if r["tags"].get("soak") == str(victim)]):
            call_until_up(ws, lambda: ws._call("cancel", run_id=run["run_id"]))
    while agent.kills < args.kills:
        time.sleep(0.5)
    stop_killing.set()
    kill_thread.join()

    # Everything ends, then the hub catches up (it is left up from here on).
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        runs = call_until_up(ws, lambda: list(ws.list_runs(experiment="soak", all=True)))
        if len(runs) >= len(expected) and all(r["status"] in TERMINAL for r in runs):
            break
        time.sleep(1)
    hub.period = 1e9
    hub.started = time.monotonic()

    problems = []
    by_tag = {}
    for run in runs:
        by_tag.setdefault(run["tags"].get("soak"), []).append(run)
    lost = [tag for tag in expected if tag not in by_tag]
    duplicated = [tag for tag, found in by_tag.items() if len(found) > 1]
    problems += [f"run {tag} lost" for tag in lost] + [f"run {tag} submitted {len(by_tag[tag])} times" for tag in duplicated]
    wrong = 0
    for tag, want in expected.items():
        for run in by_tag.get(tag, []):
            got = {key: run.get(key) for key in want if key != "kind"}
            if got != {key: value for key, value in want.items() if key != "kind"}:
                wrong += 1
                problems.append(f"run {tag} ({want['kind']}) ended {run['status']} exit {run['exit_code']} "
                                f"reason {run['reason']}, expected {want}")
                continue
            log = b"".join(item["data"] for item in ws._stream("logs", run_id=run["run_id"], follow=False)).decode()
            # A canceled run may be stopped before its first line; the others print both.
            lines = [f"start-{tag}", f"end-{tag}"] if want["kind"] in ("ok", "fail") else []
            if any(line not in log for line in lines):
                problems.append(f"run {tag}: log incomplete: {log!r}")

    events = list(ws.watch(0, follow=False))
    seqs = [event["seq"] for event in events]
    gaps = [(a, b) for a, b in zip(seqs, seqs[1:]) if b != a + 1]
    if seqs and seqs[0] != 1:
        gaps.insert(0, (0, seqs[0]))
    problems += [f"event seq jumps from {a} to {b}" for a, b in gaps]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not set(seqs) <= hub.received:
        time.sleep(0.5)
    missing_at_hub = sorted(set(seqs) - hub.received)
    if missing_at_hub:
        problems.append(f"hub missing {len(missing_at_hub)} events, first {missing_at_hub[:5]}")

    leaked = subprocess.run(["pgrep", "-f", MARKER], capture_output=True, text=True).stdout.split()
    if leaked:
        problems.append(f"{len(leaked)} run processes still alive: {leaked[:10]}")
    time.sleep(1)
    fds = agent.fds()
    if fds > baseline_fds + 5:
        problems.append(f"agent holds {fds} file descriptors, {baseline_fds} at start")
    agent.stop()
    hub.shutdown()

    minutes = (time.monotonic() - began) / 60
    counts = {kind: sum(1 for want in expected.values() if want["kind"] == kind) for kind in KINDS}
    report = [
        "# Soak: runs through agent SIGKILLs and a flapping hub", "",
        f"Generated by `scripts/soak --runs {args.runs} --kills {args.kills} --seed {args.seed}`, "
        f"on {os.cpu_count()} cores, in {minutes:.1f} minutes.", "",
        "| measure | value |", "|---|---|",
        f"| runs submitted | {len(expected)} ({', '.join(f'{n} {k}' for k, n in counts.items())}) |",
        f"| agent SIGKILLs and restarts | {agent.kills} |",
        f"| hub answers of 503 (flapping every {3:.0f} s) | {hub.refused} |",
        f"| runs found | {sum(len(found) for found in by_tag.values())} |",
        f"| runs lost | {len(lost)} |", f"| runs duplicated | {len(duplicated)} |",
        f"| runs with a wrong end state or exit code | {wrong} |",
        f"| events | {len(seqs)} (seq {seqs[0] if seqs else '-'} to {seqs[-1] if seqs else '-'}) |",
        f"| gaps in seq | {len(gaps)} |", f"| events missing at the hub | {len(missing_at_hub)} |",
        f"| leaked run processes | {len(leaked)} |",
        f"| agent file descriptors, start / end | {baseline_fds} / {fds} |", "",
        "**Result: " + ("pass**" if not problems else f"FAIL** ({len(problems)} problems)"), "",
    ]
    if problems:
        report += ["Problems (first 50):", ""] + [f"- {p}" for p in problems[:50]] + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report))
    print("\n".join(report))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
