"""What a run's processes get: its interpreter and environment, its variables, its ranks, what it resumes
from, and for Docker runs the container's image, mounts and limits. The supervisor asks for a
``LaunchSpec`` during ``Preparing`` and hands it to the executor.
"""

from __future__ import annotations

import json
import os
import shlex
import socket as stdsocket
from pathlib import Path

import trio

from labrun.protocol import MAX_DURATION_SECONDS_DEFAULT, parse_memory

from ._artifacts import artifact_path
from ._docker_args import translate_arguments
from ._environments import EnvironmentBuilder, PreparedEnvironment, PrepareFailed
from ._executor import LaunchSpec, Rank
from ._model import RunRecord
from ._scheduler import Allocation, Capacity
from ._slurm_plan import SlurmJob, SlurmSettings, layout

# Rendezvous for distributed runs on this machine.
MASTER_ADDR = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """Ports free right now on the loopback interface (for a run's rendezvous)."""
    sockets = []
    try:
        for _ in range(count):
            sock = stdsocket.socket()
            sock.bind((MASTER_ADDR, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()

def run_duration(spec: dict, slurm) -> int:
    """The run's time limit: its own, else (on a Slurm target with a default ``time``) the target's."""
    duration = spec["max_run_duration_seconds"]
    if slurm is not None and slurm.time is not None and duration == MAX_DURATION_SECONDS_DEFAULT:
        return slurm.time
    return duration


class LaunchPlanner:
    def __init__(self, config, store, capacity: Capacity, environments: EnvironmentBuilder, executor_name, image,
                 slurm_target=lambda spec: None):
        self.config = config
        self.store = store
        self.capacity = capacity
        self.environments = environments
        self.runs_dir = config.state_dir / "runs"
        self.executor_name = executor_name   # spec -> "local" | "docker" | "slurm"
        self.image = image                   # spec -> the Docker image, if any
        self.slurm_target = slurm_target     # spec -> the Slurm target's settings, if any
        self._shared_environments: dict[Path, EnvironmentBuilder] = {}

    def _environments(self, slurm) -> EnvironmentBuilder:
        """Slurm runs build their environments under the target's run_root, where every node sees them."""
        if slurm is None:
            return self.environments
        envs = slurm.run_root / "envs"
        if envs not in self._shared_environments:
            self._shared_environments[envs] = EnvironmentBuilder(envs)
        return self._shared_environments[envs]

    async def _resume_path(self, record: RunRecord, run_dir: Path) -> str:
        """Copy what the run resumes from into ``resume_from/``, as its owner, and make it read-only."""
        resume = record.spec["resume_from"]
        if resume["run_id"] is not None:
            source = artifact_path(self.runs_dir / resume["run_id"], resume["path"])
        else:
            source = Path(resume["path"])
        target_dir = run_dir / "resume_from"
        target_dir.mkdir()
        target = target_dir / source.name
        options = {}
        if os.geteuid() == 0 and record.uid != 0:
            os.chown(target_dir, record.uid, record.gid)
            # Copying as the owner: a user can resume only from what they may read.
            options = {"user": record.uid, "group": record.gid}
        result = await trio.run_process(["cp", "-a", "--", str(source), str(target)], capture_stderr=True,
                                        check=False, **options)
        if result.returncode != 0:
            raise PrepareFailed(f"cannot copy resume_from {str(source)!r}: "
                                f"{result.stderr.decode(errors='replace').strip()}", reason="resume_from_failed")
        await trio.run_process(["chmod", "-R", "a-w", str(target)], check=False, **options)
        return str(target)

    def _ranks(self, record: RunRecord, allocation: Allocation, logs: Path) -> list[Rank]:
        """One rank per process, with the variables the frameworks expect."""
        distributed = record.spec.get("distributed")
        if self.slurm_target(record.spec) is not None:
            # srun starts the processes; each task's variables come from Slurm's, in the batch script.
            tasks = layout(distributed).tasks if distributed is not None else 1
            if tasks == 1:
                return [Rank(log_path=logs / "std_log.txt")]
            return [Rank(log_path=logs / f"std_log_process_{rank}.txt") for rank in range(tasks)]
        if distributed is None or distributed["kind"] == "mpi":
            return [Rank(log_path=logs / "std_log.txt")]
        gpus = list(allocation.gpus)
        if distributed["kind"] == "pytorch":
            count = distributed["process_count"] or 1
            port = free_ports(1)[0]
            ranks = []
            for rank in range(count):
                env = {"MASTER_ADDR": MASTER_ADDR, "MASTER_PORT": str(port), "WORLD_SIZE": str(count),
                       "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0", "LOCAL_WORLD_SIZE": str(count)}
                if len(gpus) >= count:
                    env["CUDA_VISIBLE_DEVICES"] = env["NVIDIA_VISIBLE_DEVICES"] = gpus[rank]
                ranks.append(Rank(log_path=logs / f"std_log_process_{rank}.txt", env=env))
            return ranks
        workers = distributed["worker_count"] or 1
        servers = distributed["parameter_server_count"] if distributed["parameter_server_count"] is not None else 1
        ports = free_ports(workers + servers)
        cluster = {"worker": [f"{MASTER_ADDR}:{p}" for p in ports[:workers]]}
        if servers:
            cluster["ps"] = [f"{MASTER_ADDR}:{p}" for p in ports[workers:]]
        tasks = [("worker", i) for i in range(workers)] + [("ps", i) for i in range(servers)]
        return [Rank(log_path=logs / f"std_log_process_{n}.txt", daemon=kind == "ps",
                     env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": kind, "index": index},
                                                   "environment": "cloud"})})
                for n, (kind, index) in enumerate(tasks)]

    async def prepare(self, record: RunRecord, allocation: Allocation, token: str) -> LaunchSpec:
        """Everything before the process starts: environment, resume_from, variables, ranks."""
        spec = record.spec
        run_dir = self.runs_dir / record.run_id
        logs = run_dir / "logs"
        owned = os.geteuid() == 0 and record.uid != 0
        in_docker = self.executor_name(spec) == "docker"
        slurm = self.slurm_target(spec)
        if slurm is not None:
            # The nodes know the run directory by its place in run_root, not by the agent's link to it.
            run_dir = run_dir.resolve()
            logs = run_dir / "logs"
        if in_docker:
            # The image has its own Python and paths: the client's interpreter and environment mean nothing there.
            environment = spec.get("environment") or {"python": {}}
            interpreter = environment["python"].get("interpreter_path") or "python"
            prepared = PreparedEnvironment(python=interpreter, variables=environment.get("environment_variables"))
            env = {}
        else:
            prepared = await self._environments(slurm).prepare(spec.get("environment"), spec["interpreter"] or "python3",
                                                       logs / "environment_build.txt", run_dir / "snapshot")
            # Queued runs keep the client's environment on disk only (see Supervisor.submit).
            env = {k: v for k, v in self.store.environ(record.run_id).items() if k != "LABRUN_RUN_TOKEN"}
        env.update(prepared.variables or {})
        env.update(spec["environment_variables"])
        if prepared.bin_dir is not None:
            env["PATH"] = f"{prepared.bin_dir}:{env.get('PATH', os.defpath)}"
            env["VIRTUAL_ENV"] = str(prepared.bin_dir.parent)
        env.update({
            "LABRUN_RUN_ID": record.run_id,
            "LABRUN_EXPERIMENT": record.experiment,
            "LABRUN_SOCKET": str(self.config.socket),
            "LABRUN_OUTPUT_DIR": str(run_dir / "snapshot" / "outputs"),
            "LABRUN_RUN_TOKEN": token,
        })
        if self.capacity.gpus and slurm is None:   # Slurm sets CUDA_VISIBLE_DEVICES for its own GPUs
            devices = ",".join(allocation.gpus)
            env.update({"CUDA_VISIBLE_DEVICES": devices, "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                        "NVIDIA_VISIBLE_DEVICES": devices or "void"})
        extra: list[str] = []
        if spec.get("resume_from") is not None:
            path = await self._resume_path(record, run_dir)
            env["LABRUN_RESUME_FROM"] = path
            extra = ["--resume-from", path]
        argv = self._argv(record, prepared.python, extra, mpirun=slurm is None)
        ranks = self._ranks(record, allocation, logs)
        for rank in ranks:
            rank.log_path.touch()
            if owned:
                os.chown(rank.log_path, record.uid, record.gid)
        if len(ranks) > 1 and not (logs / "std_log.txt").exists():
            (logs / "std_log.txt").symlink_to(ranks[0].log_path.name)   # the log `labrun run` follows
        groups = []
        if owned:
            try:
                groups = os.getgrouplist(record.user, record.gid)
            except KeyError:
                groups = [record.gid]
        if slurm is not None:
            job = SlurmJob(run_id=record.run_id, argv=argv, cwd=str(run_dir / "snapshot"), logs=str(logs),
                           run_dir=str(run_dir), duration=run_duration(spec, slurm),
                           cpus=spec["resources"]["cpus"], memory=spec["resources"]["memory"],
                           gpus=spec["resources"]["gpus"], distributed=spec.get("distributed"), python=prepared.python,
                           job_name=f"labrun-{spec.get('display_name') or record.run_id}",
                           grace=self.config.stop_grace_seconds)
            settings = SlurmSettings(partition=slurm.partition, account=slurm.account, qos=slurm.qos,
                                     sbatch_args=slurm.sbatch_args, mpi=slurm.mpi)
            return LaunchSpec(run_id=record.run_id, argv=argv, env=env, cwd=run_dir / "snapshot", ranks=ranks,
                              uid=record.uid, gid=record.gid, groups=groups, slurm={"job": job, "settings": settings})
        return LaunchSpec(run_id=record.run_id, argv=argv, env=env, cwd=run_dir / "snapshot", ranks=ranks,
                          uid=record.uid, gid=record.gid, groups=groups, cores=allocation.cores,
                          memory=allocation.memory,
                          container=self._container(spec, run_dir, allocation) if in_docker else None)

    @staticmethod
    def _argv(record: RunRecord, python: str, extra: list[str], mpirun: bool = True) -> list[str]:
        """The command line: the script with its interpreter, or the command (a string through /bin/sh)."""
        spec = record.spec
        if spec["script"] is not None:
            argv = [python, spec["script"], *spec["arguments"], *extra]
        elif isinstance(spec["command"], str):
            argv = ["/bin/sh", "-c", spec["command"] + "".join(" " + shlex.quote(part) for part in extra)]
        else:
            argv = [*spec["command"], *extra]
        distributed = spec.get("distributed")
        if mpirun and distributed is not None and distributed["kind"] == "mpi":
            count = distributed["process_count_per_node"] or 1
            argv = ["mpirun", "-np", str(count), *(["--allow-run-as-root"] if record.uid == 0 else []), *argv]
        return argv

    def _container(self, spec: dict, run_dir: Path, allocation: Allocation) -> dict:
        """What the Docker executor needs beyond the process: image, mounts, limits, allowed arguments."""
        docker = spec.get("docker") or {"arguments": [], "shm_size": None}
        translated = translate_arguments(docker["arguments"], self.config.docker)
        read_only = [str(run_dir / "resume_from")] if spec.get("resume_from") is not None else []
        if self.config.socket.exists():
            read_only.append(str(self.config.socket))   # Run.get_context() inside the container
        return {
            "image": self.image(spec), "mounts": [str(run_dir / "snapshot"), str(run_dir / "logs")],
            "read_only": read_only, "host": translated["host"], "env": translated["env"], "cpus": allocation.cpus,
            "gpus": list(allocation.gpus),
            "shm_size": parse_memory(docker["shm_size"]) if docker.get("shm_size") else None,
        }
