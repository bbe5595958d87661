"""Which executor runs which run: executors are registered by target kind, and a run's kind comes from its spec.

Adding a kind means adding its module and one entry in ``FACTORIES``: a function that
builds the executor from the agent's configuration and store. ``run_agent(config,
executors=...)`` bypasses the factories (tests inject a ``FakeExecutor``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .._config import AgentConfig, TargetConfig
    from .._store import Store
    from ._base import Executor


def _local(config: "AgentConfig", store: "Store") -> "Executor":
    from .._cgroups import RunCgroups
    from ._base import agent_id
    from ._local import LocalExecutor

    cgroups = RunCgroups.detect(memory=config.resources.memory_enforcement == "auto", name=agent_id(config.state_dir))
    return LocalExecutor(cgroups, config.stop_grace_seconds)


def _docker(config: "AgentConfig", store: "Store") -> "Executor":
    from .._asyncio_bridge import AsyncioBridge
    from ._base import agent_id
    from ._docker import DockerExecutor

    return DockerExecutor(AsyncioBridge(), config.docker, agent_id(config.state_dir), config.docker_url,
                          grace=config.stop_grace_seconds, socket=config.socket,
                          used=lambda: store.get_meta("docker_used", False),
                          on_first_container=lambda: store.set_meta("docker_used", True))


def _slurm(config: "AgentConfig", store: "Store") -> "Executor":
    from ._slurm import SlurmExecutor

    return SlurmExecutor(config.stop_grace_seconds)


FACTORIES: dict[str, Callable[["AgentConfig", "Store"], "Executor"]] = {
    "local": _local,
    "docker": _docker,
    "slurm": _slurm,
}

# The kinds a target in the configuration may name.
KINDS = tuple(FACTORIES)


def build_executors(config: "AgentConfig", store: "Store") -> dict[str, "Executor"]:
    return {kind: factory(config, store) for kind, factory in FACTORIES.items()}


def kind_for(spec: dict, target: "TargetConfig | None") -> str:
    """The kind of executor a run needs: its target's, or Docker where the run asks for a container."""
    if target is not None and target.kind not in ("local", "docker"):
        return target.kind   # a cluster: it refuses what it cannot run (containers) in its admit
    docker = spec.get("docker")
    if docker is not None and docker["use_docker"]:
        return "docker"
    return target.kind if target is not None else "local"
