"""Docker runs (issue items 7 and 11): volume paths resolved before the allow-list, and containers that
are plain user processes: no capabilities, no-new-privileges, a pids limit."""

from __future__ import annotations

import os

import pytest

from labrun.agent._docker_args import DockerPolicy, translate_arguments
from labrun.protocol import BadRequest
from tests.e2e.test_docker import IMAGE, image  # noqa: F401  (the image fixture)
from tests.security.conftest import AGENT_CONFIG, AgentProcess, assert_still_serving


def test_volume_paths_are_resolved_before_the_allow_list(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "data").mkdir(parents=True)
    (allowed / "to-etc").symlink_to("/etc")
    (allowed / "to-data").symlink_to(allowed / "data")
    policy = DockerPolicy(volumes=[str(allowed)])
    for host in (f"{allowed}/../../../etc", f"{allowed}/to-etc", f"{allowed}/to-etc/cron.d", f"{allowed}/data/../..",
                 f"{allowed}/../allowed-not"):
        with pytest.raises(BadRequest, match="does not allow"):
            translate_arguments(["-v", f"{host}:/x"], policy)
    out = translate_arguments(["-v", f"{allowed}/to-data:/x:ro", "-v", f"{allowed}/data/./sub/..:/y"], policy)
    # What gets mounted is the resolved path, not the one a user could swap afterwards.
    assert out["host"]["Binds"] == [f"{allowed}/data:/x:ro", f"{allowed}/data:/y"]
    for bad in ("relative:/x", f"{allowed}:relative", f"{allowed}:/x:rshared"):
        with pytest.raises(BadRequest, match="must be /HOST/PATH"):
            translate_arguments(["-v", bad], policy)


@pytest.fixture
def docker_root_agent(shared_tmp, users, image):  # noqa: F811
    allowed = shared_tmp("volumes")
    config = AGENT_CONFIG + f'[docker]\nvolumes = ["{allowed}"]\npids_limit = 321\n'
    agent = AgentProcess(shared_tmp("a"), config)
    agent.allowed = allowed
    try:
        yield agent.start()
    finally:
        agent.stop()


@pytest.mark.docker
@pytest.mark.slow
def test_containers_are_confined(docker_root_agent, thin_client, shared_source):
    from tests.security.conftest import Client

    alice = Client(docker_root_agent, thin_client, "lrsec-alice")
    allowed = docker_root_agent.allowed
    os.symlink("/etc", allowed / "to-etc")
    result = alice.json(f"""
from labrun import DockerConfiguration, Environment, Experiment, ScriptRunConfig
from labrun.exceptions import BadRequest
env = Environment.from_docker_image("bb", {IMAGE!r})
refused = []
for volume in ["{allowed}/../../../etc:/x", "{allowed}/to-etc:/x"]:
    try:
        Experiment(ws, "sec").submit(ScriptRunConfig({str(shared_source)!r}, command=["true"], environment=env,
            docker_runtime_config=DockerConfiguration(use_docker=True, arguments=["-v", volume])))
        refused.append("accepted " + volume)
    except BadRequest as exc:
        refused.append(str(exc))
run = Experiment(ws, "sec").submit(ScriptRunConfig({str(shared_source)!r}, environment=env,
    command=["sh", "-c", "cat /proc/self/status; cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max 2>/dev/null; true"],
    docker_runtime_config=DockerConfiguration(use_docker=True)))
details = run.wait_for_completion(raise_on_error=False)
out([refused, details["status"], run.get_log()])
""")
    refused, status, log = result
    assert all("does not allow" in message for message in refused), refused
    assert status == "Completed", log
    fields = dict(line.split(":", 1) for line in log.splitlines() if ":" in line)
    assert fields["NoNewPrivs"].strip() == "1"
    for capabilities in ("CapEff", "CapPrm", "CapBnd"):
        assert int(fields[capabilities], 16) == 0, (capabilities, fields[capabilities])
    assert fields["Uid"].split()[0] == str(alice.entry.pw_uid)
    assert "321" in log.split(), log
    assert_still_serving(alice, shared_source)
