"""A short run of the fuzzer (bench/fuzz.py; scripts/fuzz runs the full million frames) against a live agent."""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_fuzzing_a_live_agent_finds_no_crash_hang_or_internal_error(tmp_path):
    out = tmp_path / "fuzz.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "fuzz.py"), "--seconds", "20", "--seed", "20",
                             "--connections", "4", "--json", str(out), "--agent-log", str(tmp_path / "agent.log")],
                            capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["crashes"] == 0, report.get("agent_log_tail")
    assert report["hangs"] == []
    assert report["frames"] > 1000 and set(report["by_kind"]) == {"bytes", "truncated", "oversized", "envelope",
                                                                     "requests", "fds"}
    # Every reply to a bad request is a client error; "internal" would be a bug found.
    assert "internal" not in report["replies"], (tmp_path / "agent.log").read_text()[-4000:]
    assert report["replies"]["bad_request"] > 0 and report["replies"]["ok"] > 0
    # Every open file passed with a frame was closed again, whatever became of its frame (this short run is all
    # warm-up: compared with the agent at launch, which has the MLflow UI and its clients still to open).
    assert report["agent_fds"]["end"] <= report["agent_fds"]["launch"] + 32, report["agent_fds"]
    log = (tmp_path / "agent.log").read_text()
    assert "request.failed" not in log and "connection.failed" not in log and "Traceback" not in log, result.stderr
