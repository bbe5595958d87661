"""Runs in Docker containers, against a real engine and an image built here with ``docker import``."""

import io
import os
import shutil
import subprocess
import tarfile
import time

import pytest

from labrun import DockerConfiguration, Environment, Experiment, ScriptRunConfig
from labrun.exceptions import BadRequest
from tests.e2e.test_agent import as_nobody, needs_root, nobody_client, shared_source, wait_until  # noqa: F401

pytestmark = pytest.mark.docker
IMAGE = "labrun-test-busybox:1"


def _docker(*args, check=True, **kwargs):
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120, check=check, **kwargs)


@pytest.fixture(scope="session")
def image():
    """A busybox image made from Debian's busybox-static: no registry needed."""
    if shutil.which("docker") is None or _docker("info", check=False).returncode != 0:
        if os.environ.get("LABRUN_REQUIRE_DOCKER") == "1":
            pytest.fail("LABRUN_REQUIRE_DOCKER=1 but no Docker engine answers")
        pytest.skip("no Docker engine answers (scripts/test installs and starts one)")
    if _docker("image", "inspect", IMAGE, check=False).returncode != 0:
        busybox = shutil.which("busybox") or "/bin/busybox"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as rootfs:
            rootfs.add(busybox, arcname="bin/busybox")
            for tool in ("sh", "echo", "sleep", "id", "cat", "ls", "head", "tr", "df", "hostname", "touch", "env"):
                link = tarfile.TarInfo(f"bin/{tool}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                rootfs.addfile(link)
            for directory in ("tmp", "etc", "proc", "sys", "dev"):
                entry = tarfile.TarInfo(directory)
                entry.type, entry.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
                rootfs.addfile(entry)
        subprocess.run(["docker", "import", "-", IMAGE], input=buffer.getvalue(), check=True, capture_output=True,
                       timeout=120)
    return IMAGE


@pytest.fixture
def docker_agent(make_agent, image):
    agent = make_agent("[agent]\nstop_grace_seconds = 1\n[docker]\nvolumes = [\"/srv/labrun-test\"]\n")
    yield agent
    from labrun.agent.executors._docker import LABEL_AGENT, agent_id

    left = _docker("ps", "-aq", "--filter", f"label={LABEL_AGENT}={agent_id(agent.state_dir)}").stdout.split()
    assert left == [], "no container is left behind"


def container_run(agent, source, command, image=IMAGE, **kwargs):
    env = Environment.from_docker_image("busybox", image)
    docker = kwargs.pop("docker", DockerConfiguration(use_docker=True))
    config = ScriptRunConfig(str(source), command=command, environment=env, docker_runtime_config=docker, **kwargs)
    return Experiment(agent.workspace(), "docker").submit(config)


def test_a_command_in_a_container(docker_agent, source):
    run = container_run(docker_agent, source, "echo in $(hostname); ls; echo made > outputs/made.txt; "
                                              "echo $LABRUN_RUN_ID $EXAMPLE_ENV_VAR; ls /bin/busybox")
    assert run.wait_for_completion()["status"] == "Completed"
    lines = run.get_log().splitlines()
    assert lines[0].startswith("in ") and lines[0] != f"in {os.uname().nodename}"
    assert "train.py" in lines and f"{run.id} EXAMPLE_VALUE" in lines and "/bin/busybox" in lines
    assert (docker_agent.state_dir / "runs" / run.id / "outputs" / "made.txt").read_text() == "made\n"


def test_in_place_in_a_container(docker_agent, source):
    run = container_run(docker_agent, source, "pwd; touch built-here; echo kept > $LABRUN_OUTPUT_DIR/kept.txt",
                        snapshot=False)
    assert run.wait_for_completion()["status"] == "Completed"
    assert run.get_log().split()[0] == str(source)
    assert (source / "built-here").exists()
    assert (docker_agent.state_dir / "runs" / run.id / "outputs" / "kept.txt").read_text() == "kept\n"


def test_cli_image_and_shm_size(docker_agent, source):
    result = docker_agent.cli("run", "--source-dir", str(source), "--image", IMAGE, "--shm-size", "96m", "--",
                              "sh", "-c", "df -k /dev/shm | tail -1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[1] == str(96 * 1024)


def test_memory_limit_holds(docker_agent, source):
    run = container_run(docker_agent, source, "x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo survived",
                        resources={"memory": "64M"})
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Failed" and run._details["reason"] == "memory_limit_exceeded"
    assert "survived" not in run.get_log()


@needs_root
def test_runs_as_the_submitting_uid(docker_agent, shared_source, nobody_client):
    docker_agent.root.chmod(0o755)
    code = ("from labrun import Workspace, Experiment, ScriptRunConfig, Environment, DockerConfiguration\n"
            f"env = Environment.from_docker_image('bb', {IMAGE!r})\n"
            "run = Experiment(Workspace(), 'docker').submit(ScriptRunConfig('.', command='id -u; id -g', environment=env,"
            " docker_runtime_config=DockerConfiguration(use_docker=True)))\n"
            "print(run.wait_for_completion()['status']); print(run.get_log(), end='')\n")
    result = as_nobody(docker_agent, nobody_client, code, shared_source)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["Completed", "65534", "65534"]


def test_cancel_stops_and_removes_the_container(docker_agent, source):
    run = container_run(docker_agent, source, ["sleep", "300"])
    wait_until(lambda: run.get_status() == "Running", what="running")
    start = time.monotonic()
    run.cancel()
    assert run.wait_for_completion()["status"] == "Canceled"
    assert time.monotonic() - start < 20


def test_duration_limit(docker_agent, source):
    run = container_run(docker_agent, source, ["sleep", "300"], max_run_duration_seconds=2)
    assert run.wait_for_completion()["status"] == "Canceled"
    assert run._details["reason"] == "max_run_duration_exceeded"


def test_missing_image(docker_agent, source):
    run = container_run(docker_agent, source, ["true"], image="labrun-no-such-image:0")
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Failed" and run._details["reason"] == "image_not_found"
    assert "not on this machine" in run._details["error"]


def test_refused_arguments(docker_agent, source):
    for arguments, name in ((["--privileged"], "--privileged"), (["--network=host"], "--network=host"),
                            (["-v", "/etc:/host-etc"], "-v /etc:/host-etc")):
        with pytest.raises(BadRequest, match=f"spec.docker.arguments: '{name}'"):
            container_run(docker_agent, source, ["true"], docker=DockerConfiguration(use_docker=True,
                                                                                     arguments=arguments))
    with pytest.raises(BadRequest, match="a Docker run needs an image"):
        Experiment(docker_agent.workspace(), "docker").submit(ScriptRunConfig(
            str(source), command=["true"], docker_runtime_config=DockerConfiguration(use_docker=True)))
    run = container_run(docker_agent, source, "echo $FROM_ARG", docker=DockerConfiguration(
        use_docker=True, arguments=["-e", "FROM_ARG=yes"]))
    run.wait_for_completion()
    assert run.get_log() == "yes\n"


def test_orphans_are_removed_at_start(docker_agent, source):
    """An agent that has made containers looks for its orphans when it starts (one that never did, does not)."""
    from labrun.agent.executors._docker import LABEL_AGENT, LABEL_RUN, agent_id

    container_run(docker_agent, source, ["true"]).wait_for_completion()
    orphan = _docker("run", "-d", "--label", f"{LABEL_AGENT}={agent_id(docker_agent.state_dir)}", "--label",
                     f"{LABEL_RUN}=ghost", IMAGE, "sleep", "300").stdout.strip()
    docker_agent.restart()
    assert _docker("ps", "-aq", "--filter", f"id={orphan}").stdout.strip() == ""


def test_agent_restart_reattaches_to_a_running_container(docker_agent, source):
    run = container_run(docker_agent, source, ["sh", "-c", "echo before; while [ ! -e go ]; do sleep 0.1; done; "
                                                           "echo after; exit 7"])
    wait_until(lambda: run.get_status() == "Running", what="running")
    docker_agent.restart()
    assert run.get_status() == "Running"
    (docker_agent.state_dir / "runs" / run.id / "snapshot" / "go").touch()
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Failed" and run._details["exit_code"] == 7
    assert run.get_log() == "before\nafter\n"


def test_a_container_that_ended_while_the_agent_was_away_gets_its_exit_code(docker_agent, source):
    run = container_run(docker_agent, source, ["sh", "-c", "while [ ! -e go ]; do sleep 0.1; done; exit 3"])
    wait_until(lambda: run.get_status() == "Running", what="running")
    assert docker_agent.stop() == 0
    (docker_agent.state_dir / "runs" / run.id / "snapshot" / "go").touch()
    container = f"labrun-{run.id}"[:120]
    wait_until(lambda: _docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip() == "false",
               what="the container to exit")
    docker_agent.start()
    assert run.get_status() == "Failed" and run._details["exit_code"] == 3
