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
lands then cannot leave a container nobody knows about. Handle: ``{"executor": "docker",
"container": id}``; reattaching after a restart is left to a later change.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal as signals

import structlog
import trio

from ._asyncio_bridge import AsyncioBridge
from ._docker_args import DockerPolicy
from ._executor import ExitResult, LaunchSpec, StartFailed

log = structlog.get_logger("labrun.docker")

LABEL_RUN = "org.labrun.run_id"
LABEL_AGENT = "org.labrun.agent"
LOG_TO_FILE = 'exec "$@" >>"$0" 2>&1'
# Docker answers 128+N for a process killed by signal N.
SIGNAL_EXIT_BASE = 128


def agent_id(state_dir) -> str:
    return hashlib.sha256(str(state_dir).encode()).hexdigest()[:16]


class DockerExecutor:
    name = "docker"

    def __init__(self, bridge: AsyncioBridge, policy: DockerPolicy, agent: str, url: str | None = None,
                 on_first_container=lambda: None):
        self.bridge = bridge
        self.policy = policy
        self.agent = agent
        self.url = url
        self._docker = None
        # Remembered in the agent's state, so only agents that ever made a container look for orphans.
        self._on_first_container = on_first_container

    async def _client(self):
        if self._docker is None:
            import aiodocker

            self._docker = aiodocker.Docker(url=self.url)
        return self._docker

    async def close(self) -> None:
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
            failure = StartFailed(f"the Docker engine is not reachable: {exc}")
            failure.reason = "docker_unavailable"
            raise failure from None

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
            failure = StartFailed(f"image {image!r} is not on this machine"
                                  + ("" if self.policy.allow_pull else " (and this agent does not pull images)"))
            failure.reason = "image_not_found"
            raise failure

    def _config(self, launch: LaunchSpec) -> dict:
        container = launch.container
        log_path = str(launch.ranks[0].log_path)
        binds = [f"{path}:{path}:rw" for path in container["mounts"]]
        binds += [f"{path}:{path}:ro" for path in container["read_only"]]
        host = {
            "Binds": binds + container["host"].get("Binds", []),
            "Privileged": False,
            "Init": True,
            "NetworkMode": "bridge",
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

    async def start(self, launch: LaunchSpec) -> dict:
        await self._ensure_image(launch.container["image"])
        config = self._config(launch)

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
        return {"executor": "docker", "container": container_id, "pid": None}

    async def wait(self, handle: dict) -> ExitResult:
        async def wait_and_remove():
            docker = await self._client()
            container = docker.containers.container(handle["container"])
            status = await container.wait()
            state = (await container.show()).get("State", {})
            await container.delete(force=True)
            return status.get("StatusCode", state.get("ExitCode", 1)), bool(state.get("OOMKilled"))

        code, oom = await self.bridge.call(wait_and_remove)
        if code > SIGNAL_EXIT_BASE and code - SIGNAL_EXIT_BASE in signals.valid_signals():
            return ExitResult(signal=code - SIGNAL_EXIT_BASE, memory_exceeded=oom)
        return ExitResult(exit_code=code, memory_exceeded=oom)

    async def stop(self, handle: dict, grace: float) -> None:
        import aiodocker

        async def stop():
            docker = await self._client()
            try:
                await docker.containers.container(handle["container"]).stop(t=max(1, int(round(grace))))
            except aiodocker.DockerError as exc:
                if exc.status not in (304, 404):   # already stopped, or gone
                    raise

        await self.bridge.call(stop)

    async def abandon(self, handle: dict, grace: float) -> None:
        await self._remove(handle["container"], grace)

    async def _remove(self, container_id: str, grace: float) -> None:
        import aiodocker

        async def remove():
            docker = await self._client()
            container = docker.containers.container(container_id)
            try:
                await container.stop(t=max(1, int(round(grace))))
                await container.delete(force=True)
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    raise

        try:
            await self.bridge.call(remove)
        except Exception as exc:
            log.warning("docker.remove.failed", container=container_id, error=str(exc))

    async def remove_orphans(self, grace: float) -> int:
        """Remove this agent's labelled containers: called when no run is active, so none is owned."""
        async def orphans():
            docker = await self._client()
            containers = await docker.containers.list(all=True, filters=f'{{"label": ["{LABEL_AGENT}={self.agent}"]}}')
            return [c.id for c in containers]

        try:
            found = await self.bridge.call(orphans)
        except Exception as exc:   # no engine: nothing to clean
            log.info("docker.orphans.skipped", error=str(exc))
            return 0
        for container_id in found:
            log.warning("docker.orphan.removed", container=container_id)
            await self._remove(container_id, grace)
        return len(found)
