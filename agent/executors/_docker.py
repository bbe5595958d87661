"""The Docker executor: a run is a container, through aiodocker behind the asyncio bridge.

The container gets:
- the run's snapshot as its working directory, and its ``logs/`` directory, both bind-mounted at
  the same paths as on the host, so ``LABRUN_OUTPUT_DIR`` and ``./outputs`` mean the same inside;
- stdout and stderr appended to ``logs/std_log.txt`` by the container's own shell (the image needs
  ``/bin/sh``), so output never flows through the agent;
- the run's variables (not the client's whole environment: host paths make no sense in an image);
- ``--user`` the owner's uid:gid and groups; memory, CPU and GPU limits as native Docker limits
  (GPUs as a device request for exactly the run's devices); ``shm_size``; an init process that
  forwards signals; never privileged, no added capabilities, no host network, IPC or mounts beyond
  what the agent's ``[docker]`` policy allows;
- the label ``org.labrun.run_id`` and this agent's ``org.labrun.agent``, so orphans are found.

Stop: ``docker stop`` (SIGTERM, the grace period, SIGKILL), then remove. Containers are always
removed when their run ends. Create and start are shielded from cancellation, so a cancel that
lands then cannot leave a container nobody knows about. Handle: ``DockerHandle`` (the container id).

Containers outlive the agent: a restarted agent reattaches by container id (``recover``:
inspect, then wait), records the exit code of one that ended meanwhile, and at start removes
only the labelled containers no run owns (``reconcile``).
"""

from __future__ import annotations

import contextlib
import functools
import signal as signals
from dataclasses import dataclass

import structlog
import trio

from labrun.protocol import parse_memory

from .._asyncio_bridge import AsyncioBridge
from .._docker_args import DockerPolicy, moved_volumes, translate_arguments
from .._mlflow_setup import ContainerNetwork
from ._base import (
    Capabilities, Ended, Executor, ExitResult, Handle, LaunchSpec, Live, Lost, Preparation, Recovery, StartFailed,
    agent_id, refuse,
)

__all__ = ["DockerExecutor", "DockerHandle", "LABEL_AGENT", "LABEL_RUN", "agent_id", "image_for"]

log = structlog.get_logger("labrun.docker")

LABEL_RUN = "org.labrun.run_id"
LABEL_AGENT = "org.labrun.agent"
LOG_TO_FILE = 'exec "$@" >>"$0" 2>&1'
NETWORK_MODE = "bridge"   # unless the run's arguments choose another, as the agent's policy allows
# Docker answers 128+N for a process killed by signal N.
SIGNAL_EXIT_BASE = 128


def image_for(spec: dict, target) -> str | None:
    """The run's image: its environment's base image, else its target's."""
    environment = spec.get("environment") or {}
    return (environment.get("docker") or {}).get("base_image") or (target.image if target else None)


@dataclass(frozen=True)
class DockerHandle(Handle):
    kind = "docker"

    container: str

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        return data   # version 0: {"executor": "docker", "container": id}


def _exit_result(code: int, oom: bool) -> ExitResult:
    if code > SIGNAL_EXIT_BASE and code - SIGNAL_EXIT_BASE in signals.valid_signals():
        return ExitResult(signal=code - SIGNAL_EXIT_BASE, memory_exceeded=oom)
    return ExitResult(exit_code=code, memory_exceeded=oom)


class DockerExecutor(Executor):
    kind = "docker"
    capabilities = Capabilities(gpus=True, containers=True, outlives_agent=True)
    handle_type = DockerHandle

    def __init__(self, bridge: AsyncioBridge, policy: DockerPolicy, agent: str, url: str | None = None, *,
                 grace: float = 10.0, socket=None, used=lambda: True, on_first_container=lambda: None):
        self.bridge = bridge
        self.policy = policy
        self.agent = agent
        self.url = url
        self.grace = grace
        self.socket = socket   # the agent's socket, mounted for Run.get_context() inside the container
        self._docker = None
        # Remembered in the agent's state, so only agents that ever made a container look for orphans
        # (and an agent that never used Docker does not wait for an engine at start).
        self._used = used
        self._on_first_container = on_first_container

    async def _client(self):
        if self._docker is None:
            import aiodocker

            self._docker = aiodocker.Docker(url=self.url)
        return self._docker

    def admit(self, spec: dict, target) -> None:
        if spec.get("distributed") is not None:
            refuse("distributed", "distributed runs in Docker containers are not supported yet")
        super().admit(spec, target)
        if image_for(spec, target) is None:
            refuse("docker", "a Docker run needs an image: Environment.from_docker_image(name, image), "
                             "environment.docker.base_image, a target's image, or --image")
        translate_arguments((spec.get("docker") or {}).get("arguments", []), self.policy)
        environment = spec.get("environment")
        if environment is not None and not environment["python"]["user_managed_dependencies"] and (
                environment["python"].get("pip_requirements") or environment["python"].get("conda_specification")):
            refuse("environment", "pip or conda dependencies on top of a Docker image are not built by this "
                                  "agent: bake them into the image")

    async def prepare(self, preparation: Preparation) -> LaunchSpec:
        spec, run_dir, allocation = preparation.record.spec, preparation.run_dir, preparation.allocation
        docker = spec.get("docker") or {"arguments": [], "shm_size": None}
        translated = translate_arguments(docker["arguments"], self.policy)
        mode = translated["host"].get("NetworkMode", NETWORK_MODE)
        launch = await preparation.planner.plan(preparation, in_container=True, container_network=ContainerNetwork(
            mode, functools.partial(self._gateway, mode)))
        read_only = [str(run_dir.resume_from)] if spec.get("resume_from") is not None else []
        if self.socket is not None and self.socket.exists():
            read_only.append(str(self.socket))   # Run.get_context() inside the container
        mounts = [str(launch.cwd), str(run_dir.logs)]
        if launch.cwd != run_dir.snapshot:   # in place: the run's outputs directory is still its record's
            mounts.append(str(run_dir.snapshot))
        launch.container = {
            "image": image_for(spec, preparation.target), "mounts": mounts,
            "read_only": read_only, "host": translated["host"], "env": translated["env"], "cpus": allocation.cpus,
            "gpus": list(allocation.gpus),
            "shm_size": parse_memory(docker["shm_size"]) if docker.get("shm_size") else None,
        }
        return launch

    async def aclose(self) -> None:
        if self._docker is not None:
            await self.bridge.call(self._docker.close)
            self._docker = None
        self.bridge.close()

    @contextlib.contextmanager
    def _start_errors(self, what: str):
        """Docker's errors while starting a run, as the run's failure: refused, or no engine at all."""
        import aiodocker

        try:
            yield
        except aiodocker.DockerError as exc:
            raise StartFailed(f"{what}: {exc.message}") from None
        except OSError as exc:
            raise StartFailed(f"the Docker engine is not reachable: {exc}", "docker_unavailable") from None

    async def _ensure_image(self, image: str) -> None:
        import aiodocker

        async def inspect():
            docker = await self._client()
            try:
                await docker.images.inspect(image)
                return True
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    raise
            if not self.policy.allow_pull:
                return False
            await docker.images.pull(image)
            return True

        with self._start_errors(f"cannot use image {image!r}"):
            found = await self.bridge.call(inspect)
        if not found:
            raise StartFailed(f"image {image!r} is not on this machine"
                              + ("" if self.policy.allow_pull else " (and this agent does not pull images)"),
                              "image_not_found")

    async def _gateway(self, network: str) -> str | None:
        """This machine's address on a Docker network (its IPAM gateway), or None if Docker does not say."""
        import aiodocker

        async def inspect():
            docker = await self._client()
            return await (await docker.networks.get(network)).show()

        try:
            found = await self.bridge.call(inspect)
        except (aiodocker.DockerError, OSError) as exc:
            log.warning("docker.network.inspect_failed", network=network, error=str(exc))
            return None
        for config in (found.get("IPAM") or {}).get("Config") or []:
            if config.get("Gateway"):
                return config["Gateway"].split("/")[0]
        return None

    def _config(self, launch: LaunchSpec) -> dict:
        container = launch.container
        log_path = str(launch.ranks[0].log_path)
        binds = [f"{path}:{path}:rw" for path in container["mounts"]]
        binds += [f"{path}:{path}:ro" for path in container["read_only"]]
        host = {
            "Binds": binds + container["host"].get("Binds", []),
            "Privileged": False,
            "Init": True,
            "NetworkMode": NETWORK_MODE,
            "GroupAdd": [str(g) for g in launch.groups],
            **{k: v for k, v in container["host"].items() if k != "Binds"},
            # A run is a plain user process: no capabilities, no way to gain privileges, bounded forks.
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges:true"],
            "PidsLimit": self.policy.pids_limit,
        }
        if container.get("shm_size"):
            host["ShmSize"] = container["shm_size"]
        if launch.memory is not None:
            host["Memory"] = launch.memory
            host["MemorySwap"] = launch.memory
        if launch.cores:
            host["CpusetCpus"] = ",".join(map(str, launch.cores))
        host["NanoCpus"] = int(container["cpus"] * 1e9)
        if container["gpus"]:
            host["DeviceRequests"] = [{"Driver": "nvidia", "DeviceIDs": list(container["gpus"]),
                                       "Capabilities": [["gpu"]]}]
        return {
            "Image": container["image"],
            "Entrypoint": ["/bin/sh", "-c", LOG_TO_FILE, log_path],
            "Cmd": launch.argv,
            "Env": [f"{k}={v}" for k, v in {**launch.env, **launch.ranks[0].env}.items()] + container["env"],
            "WorkingDir": str(launch.cwd),
            "User": f"{launch.uid}:{launch.gid}",
            "Labels": {LABEL_RUN: launch.run_id, LABEL_AGENT: self.agent},
            "HostConfig": host,
        }

    async def start(self, launch: LaunchSpec) -> DockerHandle:
        await self._ensure_image(launch.container["image"])
        config = self._config(launch)
        # The volumes were checked at prepare, and pulling an image takes a while: checked again now.
        moved = moved_volumes(launch.container["host"].get("Binds", []))
        if moved:
            raise StartFailed(f"the volume {moved[0]!r} resolves to another path than when it was checked "
                              "(a link swapped in?); it is not mounted")

        async def create_and_start():
            docker = await self._client()
            container = await docker.containers.create(config, name=f"labrun-{launch.run_id}"[:120])
            try:
                await container.start()
            except BaseException:
                await container.delete(force=True)
                raise
            return container.id

        self._on_first_container()
        # Shielded: a cancel landing mid-create must not leave a container no handle knows of.
        with trio.CancelScope(shield=True), self._start_errors("Docker refused the container"):
            container_id = await self.bridge.call(create_and_start)
        return DockerHandle(container=container_id)

    async def wait(self, handle: DockerHandle) -> ExitResult:
        async def wait_and_remove():
            docker = await self._client()
            container = docker.containers.container(handle.container)
            status = await container.wait()
            state = (await container.show()).get("State", {})
            await container.delete(force=True)
            return status.get("StatusCode", state.get("ExitCode", 1)), bool(state.get("OOMKilled"))

        return _exit_result(*await self.bridge.call(wait_and_remove))

    async def stop(self, handle: DockerHandle, grace: float) -> None:
        await self._stop(handle.container, grace, delete=False)

    async def _stop(self, container_id: str, grace: float, *, delete: bool) -> None:
        """``docker stop`` (SIGTERM, ``grace``, SIGKILL), then with ``delete`` ``docker rm``; gone is no error."""
        import aiodocker

        async def stop():
            docker = await self._client()
            container = docker.containers.container(container_id)
            try:
                await container.stop(t=max(1, int(round(grace))))
                if delete:
                    await container.delete(force=True)
            except aiodocker.DockerError as exc:
                if exc.status not in (304, 404):   # already stopped, or gone
                    raise

        await self.bridge.call(stop)

    async def recover(self, handle: DockerHandle) -> Recovery:
        """By container id: running (or about to) is ``Live``; exited is ``Ended`` (and removed)."""
        import aiodocker

        async def inspect():
            docker = await self._client()
            try:
                return (await docker.containers.container(handle.container).show()).get("State", {})
            except aiodocker.DockerError as exc:
                if exc.status == 404:
                    return None
                raise

        try:
            state = await self.bridge.call(inspect)
        except Exception as exc:
            return Lost(f"the Docker engine does not answer: {exc}")
        if state is None:
            return Lost("its container is gone")
        if state.get("Running") or state.get("Status") in ("created", "restarting", "paused"):
            return Live(handle)
        await self._remove(handle.container, self.grace)
        return Ended(_exit_result(state.get("ExitCode", 1), bool(state.get("OOMKilled"))))

    async def reconcile(self, owned: list[Handle]) -> None:
        if self._used():
            await self.remove_orphans(self.grace, keep={h.container for h in owned})

    async def _remove(self, container_id: str, grace: float) -> None:
        try:
            await self._stop(container_id, grace, delete=True)
        except Exception as exc:
            log.warning("docker.remove.failed", container=container_id, error=str(exc))

    async def remove_orphans(self, grace: float, keep: set[str] = frozenset()) -> int:
        """Remove this agent's labelled containers that no run owns (not in ``keep``)."""
        async def orphans():
            docker = await self._client()
            containers = await docker.containers.list(all=True, filters=f'{{"label": ["{LABEL_AGENT}={self.agent}"]}}')
            return [c.id for c in containers if c.id not in keep]

        try:
            found = await self.bridge.call(orphans)
        except Exception as exc:   # no engine: nothing to clean
            log.info("docker.orphans.skipped", error=str(exc))
            return 0
        for container_id in found:
            log.warning("docker.orphan.removed", container=container_id)
            await self._remove(container_id, grace)
        return len(found)
