"""The client imports and works without the agent's dependencies, and starts a per-user agent on demand."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

BLOCK_AGENT_DEPS = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('trio', 'httpx', 'aiodocker', 'structlog', 'pynvml'):
            raise ImportError(f'{name} is blocked: the client must not need it')
sys.meta_path.insert(0, Block())
"""


def test_client_works_without_trio(agent, source):
    code = BLOCK_AGENT_DEPS + f"""
import labrun
from labrun import Workspace, Experiment, ScriptRunConfig, RunConfiguration
import labrun.cli
run = Experiment(Workspace(), 'thin').submit(ScriptRunConfig({str(source)!r}, command=['echo', 'thin']))
print(run.wait_for_completion()['status'], run.get_log().strip())
assert not [m for m in sys.modules if m.split('.')[0] in ('trio', 'httpx', 'aiodocker', 'structlog')]
"""
    result = subprocess.run([sys.executable, "-c", code], env=agent.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Completed thin\n"


def test_exports_are_pinned():
    import labrun
    import labrun.agent
    import labrun.protocol

    assert labrun.__all__ == sorted([
        "ComputeTarget", "DataPath", "DockerConfiguration", "Environment", "Experiment", "MpiConfiguration",
        "PyTorchConfiguration", "Resources", "Run",
        "RunConfiguration", "ScriptRun", "ScriptRunConfig", "TensorflowConfiguration", "Workspace", "__version__",
        "get_run"])
    for name in labrun.__all__:
        assert getattr(labrun, name) is not None
    for module in (labrun.protocol, labrun.agent):
        assert all(hasattr(module, name) for name in module.__all__)


def test_autostart_of_a_per_user_agent(tmp_path, source):
    env = {k: v for k, v in os.environ.items() if k not in ("LABRUN_SOCKET", "LABRUN_NO_AUTOSTART")}
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    env.update(XDG_RUNTIME_DIR=str(runtime), XDG_STATE_HOME=str(tmp_path / "state"))
    if Path("/run/labrun/agent.sock").exists():
        import pytest

        pytest.skip("a system agent answers on this machine")
    result = subprocess.run([sys.executable, "-m", "labrun.cli", "run", "--source-dir", str(source), "--",
                             "echo", "auto"], env=env, capture_output=True, text=True, timeout=60)
    lock = tmp_path / "state" / "labrun" / "agent.lock"
    try:
        assert result.returncode == 0, result.stderr
        assert result.stdout == "auto\n"
        assert (runtime / "labrun" / "agent.sock").exists()
        again = subprocess.run([sys.executable, "-m", "labrun.cli", "ls", "--json"], env=env, capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 0 and [r["status"] for r in json.loads(again.stdout)] == ["Completed"]
    finally:
        pid = int(lock.read_text())
        os.kill(pid, 15)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
    off = subprocess.run([sys.executable, "-m", "labrun.cli", "ls"], env=dict(env, LABRUN_NO_AUTOSTART="1"),
                         capture_output=True, text=True, timeout=60)
    assert off.returncode == 125 and "autostart is off" in off.stderr
