"""Slurm, the pure parts: the ``sbatch`` command line a run becomes, its batch script, and what Slurm's
job states mean to labrun. No I/O here: the Slurm executor runs what these functions build.

- Resources: ``max_run_duration_seconds`` -> ``--time`` (Slurm counts whole minutes, rounded up),
  ``cpus`` -> ``--cpus-per-task``, ``memory`` -> ``--mem``, GPUs -> ``--gres=gpu:N``, ``node_count`` ->
  ``--nodes``, the log -> ``--output`` (the run's ``std_log.txt``, appended to).
- The batch script runs the command in the run's snapshot, in a session of its own, and records its exit
  status in the run directory (written atomically), because Slurm without an accounting database
  forgets a job's exit code soon after it ends. A SIGTERM to the script (``scancel --signal=TERM
  --batch``) is passed on to the command's process group, followed by SIGKILL after the agent's grace
  period, and the script still records how the command ended. (Slurm's own signals to a job it is
  ending wait for the cluster's ``KillWait``, and ``--full`` makes it end the job at once.)
- Distributed runs go through ``srun``: PyTorch ranks from Slurm's task variables, ``MASTER_ADDR``
  the first node and a free port there; MPI through ``srun --mpi``; TensorFlow's ``TF_CONFIG`` from
  the hosts Slurm placed the tasks on.
- Extra ``sbatch`` arguments from the target's configuration are allow-listed, as Docker arguments are.
- A labrun array is one Slurm job array (``sbatch --array=1-20%4``): Slurm's throttle, and task ``i`` of
  the job is run ``<array id>_<i>``. One batch script serves every task: it picks the task's run
  directory, command and own variables (run id, token, index) by ``$SLURM_ARRAY_TASK_ID``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from dataclasses import dataclass, field

from labrun.protocol._statuses import CANCELED, COMPLETED, FAILED, FINALIZING, QUEUED, RUNNING, STARTING

EXIT_FILE = "slurm_exit_status"
# Written before sbatch runs: a run that finds it was submitted by an agent that died before recording the job.
SUBMITTED_FILE = "slurm_submitted"

# Options a target may add to sbatch, and whether each takes a value (None: the value is optional,
# and only given as --opt=value). Everything labrun sets itself (output, chdir, export, resources,
# identity) is refused, so a configuration can never take a run's log or user away.
_SBATCH_OPTIONS: dict[str, bool | None] = {
    "--constraint": True, "-C": True, "--exclusive": None, "--nodelist": True, "-w": True, "--exclude": True,
    "-x": True, "--reservation": True, "--comment": True, "--mail-type": True, "--mail-user": True,
    "--nice": None, "--licenses": True, "-L": True, "--tmp": True, "--hint": True, "--switches": True,
    "--signal": True, "--requeue": False, "--no-requeue": False, "--wckey": True, "--begin": True,
    "--deadline": True, "--time-min": True, "--distribution": True, "-m": True, "--prefer": True,
    "--network": True, "--cpu-freq": True, "--spread-job": False, "--gpus-per-task": True, "--mem-bind": True,
}

# Slurm job state -> labrun status. Terminal states carry the run's reason.
_STATES: dict[str, tuple[str, str | None]] = {
    "PENDING": (QUEUED, None),
    "REQUEUED": (QUEUED, None),
    "REQUEUE_HOLD": (QUEUED, None),
    "REQUEUE_FED": (QUEUED, None),
    "PREEMPTED": (QUEUED, None),
    "RESV_DEL_HOLD": (QUEUED, None),
    "CONFIGURING": (STARTING, None),
    "RUNNING": (RUNNING, None),
    "SUSPENDED": (RUNNING, None),
    "STOPPED": (RUNNING, None),
    "SIGNALING": (RUNNING, None),
    "RESIZING": (RUNNING, None),
    "COMPLETING": (FINALIZING, None),
    "STAGE_OUT": (FINALIZING, None),
    "COMPLETED": (COMPLETED, None),
    "FAILED": (FAILED, "exit_code"),
    "NODE_FAIL": (FAILED, "node_fail"),
    "OUT_OF_MEMORY": (FAILED, "memory_limit_exceeded"),
    "BOOT_FAIL": (FAILED, "boot_fail"),
    "DEADLINE": (FAILED, "deadline"),
    "REVOKED": (FAILED, "revoked"),
    "SPECIAL_EXIT": (FAILED, "special_exit"),
    "TIMEOUT": (CANCELED, "max_run_duration_exceeded"),
    "CANCELLED": (CANCELED, "canceled"),
}
ENDED = frozenset(state for state, (status, _) in _STATES.items() if status in (COMPLETED, FAILED, CANCELED))

_ERRORS = {
    "node_fail": "the Slurm node running the job failed",
    "memory_limit_exceeded": "the job used more memory than it asked for (Slurm: OUT_OF_MEMORY)",
    "boot_fail": "the Slurm node could not boot for the job",
    "deadline": "the job reached its Slurm deadline",
    "revoked": "the job was revoked by Slurm (federation)",
    "special_exit": "the job ended in Slurm's SPECIAL_EXIT state",
    "max_run_duration_exceeded": "canceled: the run exceeded its time limit (Slurm: TIMEOUT)",
    "canceled": "canceled in Slurm (scancel)",
}


def map_state(state: str) -> tuple[str, str | None]:
    """A Slurm job state (``squeue %T``) -> (labrun status, reason). ``CANCELLED by 0`` counts as ``CANCELLED``."""
    return _STATES.get(state.split()[0] if state else "", (RUNNING, None))


def state_error(reason: str | None) -> str | None:
    return _ERRORS.get(reason)


# -- sbatch ------------------------------------------------------------------------------


class SbatchArgumentError(ValueError):
    pass


def check_sbatch_args(arguments: list[str]) -> list[str]:
    """The arguments, if each is allowed; else ``SbatchArgumentError`` naming the first that is not."""
    i = 0
    while i < len(arguments):
        written = arguments[i]
        option, sep, value = written.partition("=")
        if "\n" in written or "\0" in written:
            raise SbatchArgumentError(f"{written!r} holds a newline or NUL")
        if option not in _SBATCH_OPTIONS:
            raise SbatchArgumentError(
                f"{written!r} is not an sbatch argument labrun passes through (it accepts "
                f"{', '.join(sorted(o for o in _SBATCH_OPTIONS if o.startswith('--')))}); resources, output, "
                "working directory, environment and identity are set by labrun itself")
        takes = _SBATCH_OPTIONS[option]
        if takes is False and sep:
            raise SbatchArgumentError(f"{written!r}: {option} takes no value")
        if takes is True and not sep:
            if i + 1 >= len(arguments):
                raise SbatchArgumentError(f"{written!r} needs a value")
            i += 1
        i += 1
    return list(arguments)


def format_time(seconds: float) -> str:
    """Seconds -> Slurm's ``D-HH:MM:SS``, rounded up to whole minutes as Slurm enforces it."""
    minutes = max(1, math.ceil(seconds / 60))
    days, rest = divmod(minutes, 24 * 60)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00"


def parse_time(value) -> int:
    """A target's default ``time``: seconds, or Slurm's ``[D-]HH:MM:SS`` / ``MM:SS`` / ``MM``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected seconds or a Slurm time like '1-00:00:00', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be positive")
        return value
    days, dash, clock = value.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        day_count = int(days) if days else 0
    except ValueError:
        raise ValueError(f"expected a Slurm time like '1-00:00:00' or '90', got {value!r}") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or day_count < 0 or (dash and not days):
        raise ValueError(f"expected a Slurm time like '1-00:00:00' or '90', got {value!r}")
    if len(parts) == 3:
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    elif len(parts) == 2:
        # Slurm reads "MM:SS" without days, but "D-HH:MM" with them.
        seconds = parts[0] * 3600 + parts[1] * 60 if days else parts[0] * 60 + parts[1]
    else:
        seconds = parts[0] * 3600 if days else parts[0] * 60
    total = day_count * 86400 + seconds
    if total <= 0:
        raise ValueError("must be positive")
    return total


@dataclass(frozen=True)
class Layout:
    """How a run's processes spread over Slurm: nodes, tasks, and the srun that starts them."""

    nodes: int | None = 1
    tasks: int = 1
    tasks_per_node: int | None = None
    kind: str | None = None     # None: one process, no srun; "pytorch" | "mpi" | "tensorflow"
    workers: int = 0            # TensorFlow: the first ``workers`` tasks are workers, the rest parameter servers


def layout(distributed: dict | None) -> Layout:
    if distributed is None:
        return Layout()
    nodes = distributed.get("node_count") or 1
    if distributed["kind"] == "pytorch":
        # Azure ML: without a process count, one process per node.
        tasks = distributed.get("process_count") or nodes
        if tasks < nodes:
            raise ValueError(f"process_count={tasks} is smaller than node_count={nodes}")
        return Layout(nodes=nodes, tasks=tasks, tasks_per_node=tasks // nodes if tasks % nodes == 0 else None,
                      kind="pytorch")
    if distributed["kind"] == "mpi":
        per_node = distributed.get("process_count_per_node") or 1
        return Layout(nodes=nodes, tasks=nodes * per_node, tasks_per_node=per_node, kind="mpi")
    workers = distributed.get("worker_count") or 1
    servers = distributed.get("parameter_server_count")
    servers = 1 if servers is None else servers
    # Slurm places TensorFlow's tasks where they fit; TF_CONFIG then names the hosts it chose.
    return Layout(nodes=None, tasks=workers + servers, kind="tensorflow", workers=workers)


@dataclass
class SlurmJob:
    """One run as a Slurm batch job."""

    run_id: str
    argv: list[str]
    cwd: str                    # the run's snapshot
    logs: str                   # the run's logs/ directory
    run_dir: str
    duration: float             # seconds
    cpus: int = 1               # per task
    memory: int | None = None   # bytes, per node
    gpus: int = 0               # per node
    distributed: dict | None = None
    python: str = "python3"     # finds a free port for a rendezvous
    grace: float = 10.0         # a cancel's SIGTERM -> SIGKILL, in seconds

    @property
    def name(self) -> str:
        """The job's name: the run id makes it unique, so a job can be found again by its run."""
        return f"labrun-{self.run_id}"


@dataclass
class SlurmSettings:
    """A target's Slurm options (from ``[targets.<name>]``)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    mpi: str = "pmi2"


def sbatch_argv(job: SlurmJob, settings: SlurmSettings, script: str, sbatch: str = "sbatch",
                array: str | None = None) -> list[str]:
    """The full ``sbatch`` command line (no shell: every element is one argument); ``array``: ``--array``'s value."""
    plan = layout(job.distributed)
    argv = [sbatch, "--parsable", f"--job-name={job.name}",
            f"--chdir={job.cwd}", f"--output={job.logs}/std_log.txt", "--open-mode=append", "--export=ALL",
            f"--time={format_time(job.duration)}", f"--ntasks={plan.tasks}", f"--cpus-per-task={max(1, job.cpus)}"]
    if plan.nodes is not None:
        argv.append(f"--nodes={plan.nodes}")
    if plan.tasks_per_node is not None:
        argv.append(f"--ntasks-per-node={plan.tasks_per_node}")
    if job.memory is not None:
        argv.append(f"--mem={max(1, math.ceil(job.memory / (1024 * 1024)))}M")
    if job.gpus:
        argv.append(f"--gres=gpu:{job.gpus}")
    for option in ("partition", "account", "qos"):
        value = getattr(settings, option)
        if value:
            argv.append(f"--{option}={value}")
    if array is not None:
        argv.append(f"--array={array}")
    argv += settings.sbatch_args
    argv.append(script)
    return argv


def index_ranges(indices: list[int]) -> str:
    """[1, 2, 3, 5, 7, 8] -> "1-3,5,7-8", as ``--array`` takes them."""
    parts, ordered = [], sorted(set(indices))
    start = previous = ordered[0]
    for index in [*ordered[1:], None]:
        if index is not None and index == previous + 1:
            previous = index
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = index
    return ",".join(parts)


@dataclass
class SlurmArray:
    """Runs of one labrun array submitted as one Slurm job array: task ``i`` is run ``<array_id>_<i>``."""

    array_id: str
    run_root: str                      # where the members' run directories are (``<run_root>/<run id>``)
    tasks: dict[int, SlurmJob]         # index -> the member's job (its command, directories)
    task_env: dict[int, dict[str, str]] = field(default_factory=dict)   # index -> what only that member sees
    throttle: int = 0                  # at most this many tasks at once (Slurm's ``%N``); 0: no limit

    def job(self) -> SlurmJob:
        """The array's job as sbatch sees it: one name, a log per task (``%a`` is the task's index)."""
        return dataclasses.replace(self.tasks[min(self.tasks)], run_id=self.array_id, cwd=self.run_root,
                                   logs=f"{self.run_root}/{self.array_id}_%a/logs", run_dir=self.run_root)

    def array_option(self) -> str:
        return index_ranges(list(self.tasks)) + (f"%{self.throttle}" if self.throttle else "")


# -- the batch script --------------------------------------------------------------------

_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# A port free on this node right now, from the run's Python; else one derived from the job id.
_FREE_PORT = ("MASTER_PORT=$({python} -c 'import socket; s = socket.socket(); s.bind((\"\", 0)); "
              "print(s.getsockname()[1])' 2>/dev/null) || MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))")

# Run inside each srun task: the framework's variables from Slurm's.
RANK_ENV = {
    "pytorch": ('export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS" '
                'NODE_RANK="$SLURM_NODEID"{local_world}; exec "$@"'),
    "mpi": 'exec "$@"',
    "tensorflow": ('i=0; workers=""; servers=""; '
                   'for host in $LABRUN_TASK_HOSTS; do '
                   'address="\\"$host:$((LABRUN_TF_PORT + i))\\""; '
                   'if [ "$i" -lt "$LABRUN_TF_WORKERS" ]; then workers="$workers${{workers:+,}}$address"; '
                   'else servers="$servers${{servers:+,}}$address"; fi; i=$((i + 1)); done; '
                   'if [ "$SLURM_PROCID" -lt "$LABRUN_TF_WORKERS" ]; then type=worker; index=$SLURM_PROCID; '
                   'else type=ps; index=$((SLURM_PROCID - LABRUN_TF_WORKERS)); fi; '
                   'cluster="\\"worker\\": [$workers]"; '
                   '[ -n "$servers" ] && cluster="$cluster, \\"ps\\": [$servers]"; '
                   'export TF_CONFIG="{{\\"cluster\\": {{$cluster}}, \\"task\\": {{\\"type\\": \\"$type\\", '
                   '\\"index\\": $index}}, \\"environment\\": \\"cloud\\"}}"; exec "$@"'),
}


def rank_wrapper(plan: Layout) -> str:
    """The ``sh -c`` program each srun task runs before exec-ing the run's command."""
    local_world = f' LOCAL_WORLD_SIZE="{plan.tasks_per_node}"' if plan.tasks_per_node else ""
    return RANK_ENV[plan.kind].format(local_world=local_world)


def srun_argv(job: SlurmJob, settings: SlurmSettings, srun: str = "srun") -> list[str]:
    """The ``srun`` command of a distributed run (every task of the allocation, one log each)."""
    plan = layout(job.distributed)
    argv = [srun, "--kill-on-bad-exit=1", f"--ntasks={plan.tasks}", "--open-mode=append",
            f"--output={job.logs}/std_log_process_%t.txt"]
    if plan.kind == "mpi":
        argv.append(f"--mpi={settings.mpi}")
        return argv + job.argv
    return argv + ["/bin/sh", "-c", rank_wrapper(plan), "labrun-rank"] + job.argv


def _command_argv(job: SlurmJob, settings: SlurmSettings) -> list[str]:
    """What the batch script starts: the run's command, or the srun of a distributed run."""
    return job.argv if layout(job.distributed).kind is None else srun_argv(job, settings)


def _rank_logs(job: SlurmJob) -> list[str]:
    """Each rank's log, made before srun appends to it."""
    plan = layout(job.distributed)
    if plan.kind is None:
        return []
    return [f": >> {shlex.quote(f'{job.logs}/std_log_process_{rank}.txt')}" for rank in range(plan.tasks)]


def _distributed_prelude(job: SlurmJob) -> list[str]:
    """The rendezvous a distributed run's ranks need, found on the first node of the allocation."""
    q = shlex.quote
    plan = layout(job.distributed)
    lines = []
    if plan.kind == "pytorch":
        lines += ['MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                  _FREE_PORT.format(python=q(job.python)), "export MASTER_ADDR MASTER_PORT"]
    elif plan.kind == "tensorflow":
        lines += [f"LABRUN_TF_WORKERS={plan.workers}",
                  _FREE_PORT.format(python=q(job.python)).replace("MASTER_PORT", "LABRUN_TF_PORT"),
                  # The host of each task, in task order (one short step, as srun places them).
                  f"LABRUN_TASK_HOSTS=$(srun --ntasks={plan.tasks} --label hostname | sort -n | "
                  "sed 's/^ *[0-9]*: //')",
                  "export LABRUN_TF_WORKERS LABRUN_TF_PORT LABRUN_TASK_HOSTS"]
    return lines


def batch_script(job: SlurmJob, settings: SlurmSettings) -> str:
    """The batch script: runs the command (or its srun), records the exit status, exits with it."""
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        f"# labrun run {job.run_id}: written by the labrun agent, run by Slurm as the run's owner.",
        f"cd {q(job.cwd)} || exit 127",
        *_distributed_prelude(job),
        *_rank_logs(job),
    ]
    exit_file = f"{job.run_dir}/{EXIT_FILE}"
    command = " ".join(q(part) for part in _command_argv(job, settings))
    return "\n".join(lines + _run_and_record(job.grace, command, q(exit_file), q(exit_file + ".tmp"))) + "\n"


def array_batch_script(array: SlurmArray, settings: SlurmSettings) -> str:
    """One batch script for every task of a job array: the task's run is chosen by ``$SLURM_ARRAY_TASK_ID``.

    A member's own variables are exported by the script (never command-line arguments, which anyone on the
    node may read: the run's token is one); a name the shell cannot export goes through ``env``.
    """
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        f"# labrun array {array.array_id}: written by the labrun agent, run by Slurm as the runs' owner.",
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for index, job in sorted(array.tasks.items()):
        own = sorted(array.task_env.get(index, {}).items())
        odd = [f"{k}={v}" for k, v in own if not _SHELL_NAME.fullmatch(k)]
        argv = (["env", "--", *odd] if odd else []) + _command_argv(job, settings)
        lines += [
            f"{index})",
            f"  cd {q(job.cwd)} || exit 127",
            f"  labrun_exit={q(f'{job.run_dir}/{EXIT_FILE}')}",
            *(f"  export {k}={q(v)}" for k, v in own if _SHELL_NAME.fullmatch(k)),
            *(f"  {line}" for line in _rank_logs(job)),
            f"  set -- {' '.join(q(part) for part in argv)} ;;",
        ]
    lines += [
        '*) echo "labrun: task $SLURM_ARRAY_TASK_ID is not one of this array\'s runs" >&2; exit 127 ;;',
        "esac",
        *_distributed_prelude(array.job()),
    ]
    return "\n".join(lines + _run_and_record(array.job().grace, '"$@"', '"$labrun_exit"',
                                              '"$labrun_exit.tmp"')) + "\n"


def _run_and_record(grace: float, command: str, exit_file: str, exit_tmp: str) -> list[str]:
    """The end of every batch script: ``command`` in a session of its own, its exit status written to
    ``exit_tmp`` and moved to ``exit_file`` (all shell words, quoted), and the script's exit with it."""
    return [
        # The command leads a session of its own. A cancel (scancel --signal=TERM --batch) reaches this script
        # only, which passes it on to the command's process group and still records how the command ended.
        # Slurm's own SIGKILL comes only after the cluster's KillWait: the agent's grace period is kept here.
        f"labrun_stop() {{ kill -s TERM -- \"-$pid\" 2>/dev/null; "
        f"(sleep {grace:g}; kill -s KILL -- \"-$pid\" 2>/dev/null) & }}",
        "pid='' labrun_term=''",
        "trap 'labrun_term=1; [ -z \"$pid\" ] || labrun_stop' TERM",
        f"setsid {command} &",
        "pid=$!",
        '[ -z "$labrun_term" ] || labrun_stop   # a cancel that came before the command started',
        'while :; do wait "$pid"; code=$?; kill -0 "$pid" 2>/dev/null || break; done',
        f"printf '%s\\n' \"$code\" > {exit_tmp} && mv -f {exit_tmp} {exit_file}",
        'exit "$code"',
    ]


def parse_exit_status(text: str | None) -> tuple[int | None, int | None]:
    """The batch script's recorded status -> (exit code, signal); a shell reports signal N as 128+N."""
    if text is None:
        return None, None
    try:
        code = int(text.strip())
    except ValueError:
        return None, None
    if 128 < code < 128 + 65:
        return None, code - 128
    return code, None


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str
    reason: str
    nodes: str


SQUEUE_FORMAT = "%i|%T|%r|%N"


def parse_squeue(output: str) -> dict[str, JobState]:
    """``squeue --noheader --format=%i|%T|%r|%N`` -> job id -> its state."""
    found = {}
    for line in output.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4 or not parts[0]:
            continue
        found[parts[0]] = JobState(*parts)
    return found


def array_job_of(job_id: str) -> str | None:
    """The job array's id of an array task (``1234_3`` -> ``1234``); None for a plain job."""
    base, sep, index = job_id.partition("_")
    return base if sep and index.isdigit() else None


def with_array_remainders(found: dict[str, JobState], asked: list[str]) -> dict[str, JobState]:
    """Tasks of a job array that never started and were canceled together are one record under the array's
    id (``1234|CANCELLED``), not one each: each such task has that record's state."""
    for job_id in asked:
        base = array_job_of(job_id)
        if job_id not in found and base is not None and base in found:
            found[job_id] = dataclasses.replace(found[base], job_id=job_id)
    return found


def sbatch_job_id(output: str) -> str:
    """``sbatch --parsable`` prints ``<job id>[;<cluster>]``."""
    job_id = output.strip().split(";")[0]
    if not job_id.isdigit():
        raise ValueError(f"sbatch printed {output.strip()!r}, not a job id")
    return job_id
