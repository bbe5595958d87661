"""How long a restarted agent takes to be ready again with many runs running (reattaching to each run's shim).

Usage: python bench/recovery.py [--runs 100]. Starts an agent on a temporary state directory, submits
``--runs`` runs that sleep, kills the agent with SIGKILL once they all run, starts it again, and measures
the time until it answers (recovery is done before it answers) and until every run reads ``Running``.
Prints a table and writes it to bench/results/recovery.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from labrun._connection import AgentConnection
from labrun.exceptions import AgentUnavailable

RESULTS = Path(__file__).resolve().parent / "results" / "recovery.md"


def answers(socket: Path) -> bool:
    try:
        with AgentConnection(socket) as connection:
            connection.call("status")
        return True
    except (OSError, AgentUnavailable):
        return False


def start(root: Path) -> subprocess.Popen:
    log = open(root / "agent.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "labrun.agent", "--socket", str(root / "a.sock"), "--state-dir",
                             str(root / "state"), "--config", str(root / "agent.toml")], stdout=log, stderr=log)


def wait_for(predicate, timeout: float) -> float:
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            raise TimeoutError
        time.sleep(0.01)
    return time.monotonic() - began


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory(prefix="labrun-recovery-") as directory:
        root = Path(directory)
        (root / "agent.toml").write_text(f"[resources]\ncpus = {runs}\n[agent]\nstop_grace_seconds = 1\n")
        socket = root / "a.sock"
        agent = start(root)
        wait_for(lambda: answers(socket), 60)
        with AgentConnection(socket) as connection:
            ids = [connection.call("submit", spec={"experiment": "recovery", "command": ["sleep", "600"],
                                                   "snapshot": {"files": []}})["run_id"] for _ in range(runs)]

        def all_running() -> bool:
            with AgentConnection(socket) as connection:
                return all(connection.call("get", run_id=i)["status"] == "Running" for i in ids)

        wait_for(all_running, 300)
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        os.unlink(socket)
        began = time.monotonic()
        agent = start(root)
        ready = wait_for(lambda: answers(socket), 120)
        running = ready + wait_for(all_running, 120)
        with AgentConnection(socket) as connection:
            for run_id in ids:
                connection.call("cancel", run_id=run_id)
        agent.send_signal(signal.SIGTERM)
        agent.wait()
        total = time.monotonic() - began
    table = ("| runs running at the kill | agent answers again | every run reads Running |\n|---|---|---|\n"
             f"| {runs} | {ready:.2f} s | {running:.2f} s |\n")
    print(table, end="")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("# Recovery after kill -9\n\n" + table + f"\n(whole restart-and-cancel cycle: {total:.1f} s)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
