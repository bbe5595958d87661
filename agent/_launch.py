"""What a run's processes get: its interpreter and environment, its variables, its ranks and what it
resumes from. Executors plan their launches with it (``Executor.prepare``) during ``Preparing``; what
only one kind needs (a container's image, mounts and limits) is that executor's own.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import socket as stdsocket
from pathlib import Path

import trio

from labrun.protocol._manifest import tree_hash

from ._artifacts import artifact_path, owner_of
from ._asuser import Credentials, acting_as, open_directory, open_file_as
from ._environments import EnvironmentBuilder, PreparedEnvironment, PrepareFailed
from ._warnings import KIND as WARNINGS
from ._model import RunRecord
from ._ready import ReadyCopies
from ._rundir import RunDir, runs_root
from ._scheduler import Allocation, Capacity
from ._snapshot import ContentStore, SnapshotFailed, materialize
from .executors._base import LaunchSpec, Preparation, Rank

# Snapshots this small are made inline: faster than the hop to a worker thread.
INLINE_MATERIALIZE_FILES = 100
INLINE_MATERIALIZE_BYTES = 4 * 1024 * 1024
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



def _link_first_log(logs: Path, first: str) -> None:
    """``std_log.txt`` for a run of many ranks: the first rank's log (the one `labrun run` follows).

    A hard link, not a symlink: a run's files are read without following links.
    """
    dir_fd = open_directory(logs)
    try:
        os.link(first, "std_log.txt", src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        pass
    finally:
        os.close(dir_fd)


class LaunchPlanner:
    def __init__(self, config, store, capacity: Capacity, environments: EnvironmentBuilder, snapshots: ContentStore):
        self.config = config
        self.snapshots = snapshots
        self.store = store
        self.capacity = capacity
        self.environments = environments
        self.mlflow = None                   # the agent's MLflow side (_mlflow_setup.Mlflow), if any
        self.ready: ReadyCopies | None = None   # copies of repeated trees made ahead (see _ready)

    async def _resume_path(self, record: RunRecord, run_dir: RunDir, creds: Credentials) -> str:
        """Copy what the run resumes from into ``resume_from/``, as its owner, and make it read-only.

        Copying as the owner: a user can resume only from what they may read, and nothing is copied
        or created in their run directory with root's rights.
        """
        resume = record.spec["resume_from"]
        if resume["run_id"] is not None:
            source = artifact_path(RunDir.of(self.config.state_dir, resume["run_id"]), resume["path"])
        else:
            source = Path(resume["path"])
        target_dir = run_dir.resume_from
        try:
            with acting_as(creds):
                target_dir.mkdir()
        except OSError as exc:
            raise PrepareFailed(f"cannot create {target_dir.name}/ in the run directory: {exc.strerror or exc}",
                                reason="resume_from_failed") from None
        target = target_dir / source.name
        options = creds.popen_options()
        result = await trio.run_process(["cp", "-a", "--", str(source), str(target)], capture_stderr=True,
                                        check=False, **options)
        if result.returncode != 0:
            raise PrepareFailed(f"cannot copy resume_from {str(source)!r}: "
                                f"{result.stderr.decode(errors='replace').strip()}", reason="resume_from_failed")
        await trio.run_process(["chmod", "-R", "a-w", str(target)], check=False, **options)
        return str(target)

    def _ranks(self, record: RunRecord, allocation: Allocation, run_dir: RunDir) -> list[Rank]:
        """One rank per process, with the variables the frameworks expect."""
        distributed = record.spec.get("distributed")
        if distributed is None or distributed["kind"] == "mpi":
            return [Rank(log_path=run_dir.std_log)]
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
                ranks.append(Rank(log_path=run_dir.rank_log(rank), env=env))
            return ranks
        workers = distributed["worker_count"] or 1
        servers = distributed["parameter_server_count"] if distributed["parameter_server_count"] is not None else 1
        ports = free_ports(workers + servers)
        cluster = {"worker": [f"{MASTER_ADDR}:{p}" for p in ports[:workers]]}
        if servers:
            cluster["ps"] = [f"{MASTER_ADDR}:{p}" for p in ports[workers:]]
        tasks = [("worker", i) for i in range(workers)] + [("ps", i) for i in range(servers)]
        return [Rank(log_path=run_dir.rank_log(n), daemon=kind == "ps",
                     env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": kind, "index": index},
                                                   "environment": "cloud"})})
                for n, (kind, index) in enumerate(tasks)]

    async def plan(self, preparation: Preparation, *, in_container: bool = False, cluster_tasks: int | None = None,
                   environments: EnvironmentBuilder | None = None, container_network=None,
                   empty_snapshot_by_run: bool = False) -> LaunchSpec:
        """Everything before the process starts: environment, resume_from, variables, ranks.

        ``in_container``: the run executes in an image, which has its own Python and paths; its
        network (``_mlflow_setup.ContainerNetwork``) says how it reaches this machine's MLflow server.
        ``cluster_tasks``: the run executes as that many tasks on a cluster (Slurm), which starts them, gives
        them their ranks and GPUs: no local ranks, GPU variables or mpirun here, one log per task.
        ``environments``: where pip environments are built (a cluster's shared directory), if not the agent's.
        ``empty_snapshot_by_run``: an empty snapshot (an empty tree, or an in-place run's) is not made here but
        named in the launch's ``empty_snapshot``, for the executor's process to make as the run's user.
        """
        record, allocation, token, run_dir = (preparation.record, preparation.allocation, preparation.token,
                                              preparation.run_dir)
        spec = record.spec
        creds = owner_of(record)
        empty_snapshot = await self._materialize(record, run_dir.root, defer_empty=empty_snapshot_by_run)
        workdir = Path(spec["in_place"]) if spec.get("in_place") else run_dir.snapshot
        if in_container:
            # The image has its own Python and paths: the client's interpreter and environment mean nothing there.
            environment = spec.get("environment") or {"python": {}}
            interpreter = environment["python"].get("interpreter_path") or "python"
            prepared = PreparedEnvironment(python=interpreter, variables=environment.get("environment_variables"))
            env = {}
        else:
            warnings: dict[str, str] = {}
            try:
                prepared = await (environments or self.environments).prepare(
                    spec.get("environment"), spec["interpreter"] or "python3", run_dir.environment_log, creds,
                    warnings)
            finally:
                if warnings:   # a failed build's too: they say why it may have failed
                    self.store.set_labels(record.run_id, WARNINGS, warnings)
            # Queued runs keep the client's environment on disk only (see Supervisor.submit).
            env = {k: v for k, v in self.store.environ(record.run_id).items() if k != "LABRUN_RUN_TOKEN"}
        env.update(prepared.variables or {})
        env.update(spec["environment_variables"])
        if self.mlflow is not None:
            await self.mlflow.prepare_env(record, env, {**(prepared.variables or {}), **spec["environment_variables"]},
                                          run_dir.std_log, container_network if in_container else None)
        if prepared.bin_dir is not None:
            env["PATH"] = f"{prepared.bin_dir}:{env.get('PATH', os.defpath)}"
            env["VIRTUAL_ENV"] = str(prepared.bin_dir.parent)
        env.update({
            "LABRUN_RUN_ID": record.run_id,
            "LABRUN_EXPERIMENT": record.experiment,
            "LABRUN_SOCKET": str(self.config.socket),
            "LABRUN_OUTPUT_DIR": str(run_dir.outputs),
            "LABRUN_RUN_TOKEN": token,
        })
        if spec.get("array") is not None:
            env.update(array_environment(spec["array"]))
        if self.capacity.gpus and cluster_tasks is None:
            devices = ",".join(allocation.gpus)
            env.update({"CUDA_VISIBLE_DEVICES": devices, "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                        "NVIDIA_VISIBLE_DEVICES": devices or "void"})
        extra: list[str] = []
        if spec.get("resume_from") is not None:
            path = await self._resume_path(record, run_dir, creds)
            env["LABRUN_RESUME_FROM"] = path
            extra = ["--resume-from", path]
        argv = self._argv(record, prepared.python, extra, mpirun=cluster_tasks is None)
        if cluster_tasks is None:
            ranks = self._ranks(record, allocation, run_dir)
        elif cluster_tasks == 1:
            ranks = [Rank(log_path=run_dir.std_log)]
        else:
            ranks = [Rank(log_path=run_dir.rank_log(task)) for task in range(cluster_tasks)]
        try:
            for rank in ranks:
                os.close(open_file_as(creds, rank.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND))
            if ranks[0].log_path.name != "std_log.txt":
                with acting_as(creds):
                    _link_first_log(run_dir.logs, ranks[0].log_path.name)
        except OSError as exc:
            raise PrepareFailed(f"cannot create the run's logs: {exc.strerror or exc}", reason="agent_error") from None
        return LaunchSpec(run_id=record.run_id, argv=argv, env=env, cwd=workdir, ranks=ranks,
                          uid=record.uid, gid=record.gid, groups=list(creds.groups) if creds.switches else [], cores=allocation.cores,
                          memory=allocation.memory, run_dir=run_dir,
                          empty_snapshot=run_dir.snapshot if empty_snapshot else None)

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

    async def _materialize(self, record: RunRecord, run_dir: Path, *, defer_empty: bool = False) -> bool:
        """The run's ``snapshot/`` from the contents stored at submit (only ``outputs/`` for an in-place run).

        With ``defer_empty``, an empty one is not made: returns True, and the run's process makes it.
        """
        entries = self.snapshots.entries(record.run_id) or []
        if not entries and defer_empty:
            return True
        creds = owner_of(record)
        tree = None
        # Ready copies are made beside the agent's run directories: a cluster's (run_root) is elsewhere.
        if self.ready is not None and entries and run_dir.parent == runs_root(self.config.state_dir):
            tree = tree_hash(entries)
            if await self.ready.take(creds, tree, run_dir):
                self.ready.want(creds, tree, entries)
                return False
        work = functools.partial(materialize, self.snapshots, entries, run_dir, creds)
        try:
            if len(entries) <= INLINE_MATERIALIZE_FILES and sum(e[1] for e in entries) <= INLINE_MATERIALIZE_BYTES:
                work()
            else:
                await trio.to_thread.run_sync(work)
        except SnapshotFailed as exc:
            raise PrepareFailed(str(exc), reason="snapshot_failed") from None
        if tree is not None:
            self.ready.want(creds, tree, entries)
        return False


def array_environment(array: dict) -> dict[str, str]:
    """What an array member sees: labrun's names, and Slurm's so Slurm scripts work unchanged."""
    return {
        "LABRUN_ARRAY_ID": array["id"],
        "LABRUN_ARRAY_INDEX": str(array["index"]),
        "SLURM_ARRAY_JOB_ID": array["id"],
        "SLURM_ARRAY_TASK_ID": str(array["index"]),
        "SLURM_ARRAY_TASK_COUNT": str(array["size"]),
    }
