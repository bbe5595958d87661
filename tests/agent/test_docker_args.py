"""The allow-list for DockerConfiguration.arguments: what passes, what is refused, by name."""

import re

import pytest

from labrun.agent._docker_args import DockerPolicy, moved_volumes, translate_arguments
from labrun.protocol import BadRequest


def test_allowed_arguments():
    out = translate_arguments(["--shm-size=1g", "--ipc", "private", "-e", "A=1", "--ulimit=nofile=1024:2048",
                               "--tmpfs=/scratch:size=64m", "--network=none"], DockerPolicy())
    assert out["host"] == {"ShmSize": 1 << 30, "IpcMode": "private", "Ulimits": [{"Name": "nofile", "Soft": 1024,
                                                                                  "Hard": 2048}],
                           "Tmpfs": {"/scratch": "size=64m"}, "NetworkMode": "none"}
    assert out["env"] == ["A=1"]


@pytest.mark.parametrize("arguments, message", [
    (["--privileged"], "'--privileged' is not a docker run argument this agent accepts"),
    (["--cap-add=SYS_ADMIN"], "'--cap-add=SYS_ADMIN' is not"),
    (["--network=host"], "not allowed by this agent (allow_host_network)"),
    (["--ipc", "host"], "'--ipc host' is not allowed"),
    (["-v", "/etc:/etc"], "mounts a host path this agent does not allow"),
    (["-v", "/data2:/d"], "does not allow"),
    (["-e"], "needs a value"),
    (["--shm-size=lots"], "'--shm-size=lots'"),
])
def test_refused_arguments_are_named(arguments, message):
    with pytest.raises(BadRequest, match=re.escape(message)):
        translate_arguments(arguments, DockerPolicy(volumes=["/data"]))


def test_policy_opens_what_it_allows():
    policy = DockerPolicy(allow_host_network=True, allow_host_ipc=True, volumes=["/data"])
    out = translate_arguments(["--network=host", "--ipc=host", "-v", "/data/set:/d:ro"], policy)
    assert out["host"]["NetworkMode"] == "host" and out["host"]["Binds"] == ["/data/set:/d:ro"]


def test_a_volume_that_resolves_elsewhere_at_start_is_named():
    policy = DockerPolicy(volumes=["/data"])
    links = {"/data/a/link": "/data/a/real"}
    binds = translate_arguments(["-v", "/data/a/link:/in:ro", "-v", "/data/b:/b"], policy,
                                resolve=lambda path: links.get(path, path))["host"]["Binds"]
    assert binds == ["/data/a/real:/in:ro", "/data/b:/b"]
    assert moved_volumes(binds, resolve=lambda path: path) == []
    links["/data/a/real"] = "/etc"   # swapped for a link after the check
    assert moved_volumes(binds, resolve=lambda path: links.get(path, path)) == ["/data/a/real"]
