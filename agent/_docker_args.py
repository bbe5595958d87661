"""The ``docker run`` arguments a run may pass (``DockerConfiguration.arguments``), and what they become.

Pure: a list of strings in, a partial HostConfig/Config out, or ``BadRequest`` naming the first
argument that is unknown or not allowed. Everything else a container gets is decided by the agent:
never privileged, no capabilities at all, ``no-new-privileges``, a pids limit, no host network
or IPC and no host mounts unless the agent's config allows them. Volume paths are resolved
(symlinks, ``..``) before the allow-list check, and the resolved path is what gets mounted; the
resolver is passed in, so the rest stays pure. Just before the container is created,
``moved_volumes`` resolves them again: a path that names something else by then (a link swapped
in after the check) fails the start. (What is left: Docker resolves the path once more when it
mounts it, at the container's start; a path under the allow-list that a user may change can
still be swapped in that window. Allow only trees their users cannot rename or link in.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from labrun.protocol import BadRequest, parse_memory


@dataclass
class DockerPolicy:
    allow_host_network: bool = False
    allow_host_ipc: bool = False
    volumes: list[str] = field(default_factory=list)   # host paths (and what is under them) runs may mount
    allow_pull: bool = False
    pids_limit: int = 4096   # processes (and threads) one container may have


def _refuse(argument: str, why: str) -> BadRequest:
    return BadRequest(f"spec.docker.arguments: {argument!r} {why}", details={"field": "spec.docker.arguments"})


def _split(arguments: list[str]) -> list[tuple[str, str | None, str]]:
    """``--opt=value``, ``--opt value`` and ``-e value`` -> (option, value, as written)."""
    takes_value = {"--shm-size", "--ipc", "--network", "--net", "-e", "--env", "--ulimit", "-v", "--volume",
                   "--tmpfs"}
    out, i = [], 0
    while i < len(arguments):
        written = arguments[i]
        option, sep, value = written.partition("=")
        if not sep and option in takes_value:
            if i + 1 >= len(arguments):
                raise _refuse(written, "needs a value")
            value = arguments[i + 1]
            written = f"{written} {value}"
            i += 1
        out.append((option, value if (sep or option in takes_value) else None, written))
        i += 1
    return out


def _allowed_volume(host: str, policy: DockerPolicy, resolve) -> bool:
    host = host.rstrip("/") or "/"
    for root in policy.volumes:
        root = resolve(root).rstrip("/")
        if host == root or host.startswith(root + "/") or root == "":
            return True
    return False


def moved_volumes(binds: list[str], resolve=os.path.realpath) -> list[str]:
    """The host paths of ``binds`` (as ``translate_arguments`` resolved them) that resolve elsewhere now."""
    sources = (bind.split(":", 1)[0] for bind in binds)
    return [source for source in sources if resolve(source) != source]


def translate_arguments(arguments: list[str], policy: DockerPolicy, resolve=os.path.realpath) -> dict:
    """Returns ``{"host": {...HostConfig...}, "env": [...]}`` for the allowed arguments.

    ``resolve`` turns a host path into the real path it names now (``os.path.realpath``).
    """
    host: dict = {}
    env: list[str] = []
    for option, value, written in _split(arguments):
        if option == "--shm-size":
            try:
                host["ShmSize"] = parse_memory(value)
            except ValueError as exc:
                raise _refuse(written, str(exc)) from None
        elif option == "--ipc":
            if value == "host" and not policy.allow_host_ipc:
                raise _refuse(written, "is not allowed by this agent (allow_host_ipc)")
            if value not in ("host", "private", "shareable", "none"):
                raise _refuse(written, "must be host, private, shareable or none")
            host["IpcMode"] = value
        elif option in ("--network", "--net"):
            if value == "host" and not policy.allow_host_network:
                raise _refuse(written, "is not allowed by this agent (allow_host_network)")
            if value not in ("host", "bridge", "none"):
                raise _refuse(written, "must be bridge, none or host")
            host["NetworkMode"] = value
        elif option in ("-e", "--env"):
            if "=" not in value:
                raise _refuse(written, "must be KEY=VALUE")
            env.append(value)
        elif option == "--ulimit":
            name, _, limits = value.partition("=")
            soft, _, hard = limits.partition(":")
            try:
                host.setdefault("Ulimits", []).append({"Name": name, "Soft": int(soft), "Hard": int(hard or soft)})
            except ValueError:
                raise _refuse(written, "must be NAME=SOFT[:HARD]") from None
        elif option in ("-v", "--volume"):
            parts = value.split(":")
            if len(parts) not in (2, 3) or not parts[0].startswith("/") or not parts[1].startswith("/") \
                    or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                raise _refuse(written, "must be /HOST/PATH:/CONTAINER/PATH[:ro|:rw]")
            real = resolve(parts[0])
            if not _allowed_volume(real, policy, resolve):
                where = "" if real == parts[0] else f" (it resolves to {real})"
                raise _refuse(written, f"mounts a host path this agent does not allow{where} ([docker] volumes)")
            host.setdefault("Binds", []).append(":".join([real, *parts[1:]]))
        elif option == "--tmpfs":
            path, _, options = value.partition(":")
            host.setdefault("Tmpfs", {})[path] = options
        else:
            raise _refuse(written, "is not a docker run argument this agent accepts "
                                   "(it accepts --shm-size, --ipc, --network, -e/--env, --ulimit, --tmpfs, -v/--volume)")
    return {"host": host, "env": env}
