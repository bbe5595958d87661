"""Environment builds never run a user's code as root (issue item 3)."""

from __future__ import annotations

import stat

import pytest

from tests.security.conftest import assert_still_serving

pytestmark = pytest.mark.slow


def test_environment_builds_run_as_the_user_and_ignore_the_snapshot(clients, shared_tmp, scratch, root_agent):
    alice = clients["alice"]
    source = shared_tmp("build-src")
    # A venv.py (and pip.py) in the snapshot: under the old build, `python -m venv` ran it as root.
    for module in ("venv", "pip", "ensurepip"):
        (source / f"{module}.py").write_text(f"open({str(scratch / (module + '-pwned'))!r}, 'w').write('x')\n")
        (source / f"{module}.py").chmod(0o644)
    interpreter = scratch / "interpreter.sh"
    marker = scratch / "interpreter-uid"
    result = alice.json(f"""
import sys
# The user's own script as the build's interpreter: it may run, but only as the user.
with open({str(interpreter)!r}, "w") as f:
    f.write("#!/bin/sh\\nid -u > {marker}\\nexec {alice.python} \\"$@\\"\\n")
os.chmod({str(interpreter)!r}, 0o755)
with open({str(scratch / 'requirements.txt')!r}, "w") as f:
    f.write("--no-index\\nlrsec-no-such-package==1.0\\n")
sys.executable = {str(interpreter)!r}
from labrun import Environment, Experiment, ScriptRunConfig
env = Environment.from_pip_requirements("lrsec-build", {str(scratch / 'requirements.txt')!r})
run = Experiment(ws, "sec").submit(ScriptRunConfig({str(source)!r}, command=["true"], environment=env))
details = run.wait_for_completion(raise_on_error=False)
log = b"".join(item["data"] for item in ws._stream("download", run_id=run.id, name="user_logs/environment_build.txt"))
out([run.id, details["status"], log.decode()])
""")
    run_id, status, log = result
    # The venv was made (as alice); pip then found no such package.
    assert status == "Failed" and "lrsec-no-such-package" in log, result
    assert marker.read_text().strip() == str(alice.entry.pw_uid)
    assert marker.stat().st_uid == alice.entry.pw_uid
    for module in ("venv", "pip", "ensurepip"):
        assert not (scratch / f"{module}-pwned").exists(), f"the snapshot's {module}.py ran during the build"
    envs = root_agent.state_dir / "envs" / str(alice.entry.pw_uid)
    assert envs.stat().st_uid == alice.entry.pw_uid and stat.S_IMODE(envs.stat().st_mode) == 0o700
    assert_still_serving(clients["bob"], source)
