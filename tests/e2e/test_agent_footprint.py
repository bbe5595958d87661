"""What an idle agent holds: it has not imported asyncio (only the Docker executor's bridge uses it, and still
gets the real module), and it logs as before."""

import json
import subprocess
import sys

IDLE_AGENT = """
import os, runpy, signal, sys, threading, time
from labrun.agent._server import socket_answers

socket, state = sys.argv[1:3]

def report_when_idle():
    while not socket_answers(socket):
        time.sleep(0.02)
    time.sleep(0.3)
    print(sorted(m for m in sys.modules if m == "asyncio" or m.startswith("asyncio.")), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=report_when_idle, daemon=True).start()
sys.argv = ["labrund", "--socket", socket, "--state-dir", state]
runpy.run_module("labrun.agent", run_name="__main__", alter_sys=True)
"""


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter (the modules it imports are its own), which must succeed."""
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def test_an_idle_agent_has_not_imported_asyncio_and_logs_json_lines(tmp_path):
    result = python(IDLE_AGENT, str(tmp_path / "agent.sock"), str(tmp_path / "state"))
    assert result.stdout.strip() == "[]"
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    started = next(line for line in lines if line["event"] == "agent.started")
    assert started["level"] == "info" and started["timestamp"].endswith("Z") and started["socket"].endswith(".sock")
    assert [line["event"] for line in lines][-2:] == ["agent.stopping", "agent.stopped"]


def test_structlog_async_methods_still_reach_asyncio():
    """structlog holds a stand-in for asyncio; its first use imports the real module."""
    code = ("import sys, labrun.agent, structlog\n"
            "assert 'asyncio' not in sys.modules\n"
            "import asyncio\n"
            "structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stdout))\n"
            "asyncio.run(structlog.get_logger().ainfo('async.logged', n=1))\n"
            "assert structlog.stdlib.asyncio.get_running_loop is asyncio.get_running_loop\n")
    result = python(code)
    assert "async.logged" in result.stdout and "n=1" in result.stdout


def test_the_docker_bridge_still_gets_the_real_asyncio():
    """The bridge (the one place that runs asyncio code) imports asyncio itself, after structlog's stand-in."""
    code = ("import sys, trio, labrun.agent\n"
            "from labrun.agent._asyncio_bridge import AsyncioBridge\n"
            "async def sleep_and_answer():\n"
            "    import asyncio\n"
            "    await asyncio.sleep(0.01)\n"
            "    return asyncio.get_running_loop().is_running()\n"
            "async def main():\n"
            "    bridge = AsyncioBridge()\n"
            "    try:\n"
            "        return await bridge.call(sleep_and_answer)\n"
            "    finally:\n"
            "        bridge.close()\n"
            "print(trio.run(main), type(sys.modules['asyncio']).__name__)\n")
    result = python(code)
    assert result.stdout.split() == ["True", "module"]
