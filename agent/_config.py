"""The agent's configuration: a TOML file where every key has a default.

```toml
socket = "/run/labrun/agent.sock"
state_dir = "/var/lib/labrun"

[agent]
stop_grace_seconds = 10      # SIGTERM -> SIGKILL when a run is canceled
max_frame_bytes = 16777216
socket_group = "labrun"      # system agent: group that may use the socket
admin_group = "labrun-admin" # members may cancel and read any run

[resources]
cpus = 2
memory = "8G"
gpus = ["0", "1"]
max_concurrent_runs = 0

[targets.MyCluster]
kind = "local"

[targets.cluster]            # runs go to Slurm (sbatch as the submitting user)
kind = "slurm"
run_root = "/shared/labrun"  # required: a directory every node shares; holds the run directories
partition = "gpu"            # optional, as are account, qos, time (default --time) and mpi (srun --mpi=)
sbatch_args = ["--constraint=a100"]   # allow-listed extra sbatch arguments

[events]
retention_days = 30          # never deletes what the hub has not received
subscriber_buffer = 1000     # events a slow subscriber may fall behind before it gets a gap
replay_max = 10000           # events one watch request replays; then a gap to resume from (clients do)

[hub]
url = "https://hub.example.org/v1/events"
token_file = "/etc/labrun/hub.token"
batch_max = 500

[limits]                     # what one connection or user can make the agent hold
buffer_bytes_per_connection = 16777216  # partial frames; also the largest frame accepted
buffer_bytes_per_user = 67108864
buffer_bytes_total = 268435456
requests_per_connection = 128
requests_per_user = 1024
connections_per_user = 256
idle_timeout_seconds = 900   # a connection with nothing in flight is closed after this long
frame_timeout_seconds = 60   # a frame that has begun must end within this
reserved_fds = 128           # file descriptors kept for the agent itself and its runs
label_key_chars = 255
label_value_chars = 4096
labels_bytes_per_run = 262144
display_name_chars = 1024
description_chars = 4096
list_page_bytes = 4194304    # a `list` reply stops growing here (clients follow the next page)
[mlflow]
tracking_uri = "http://127.0.0.1:5000"   # mirror runs into this MLflow server
# embedded = true            # or: the agent runs its own MLflow server (needs labrun[mlflow])
# port = 5000                # embedded: default a free port, chosen once
# user = "labrun-mlflow"     # embedded: the account it runs as (default: the agent's)
run_env = true               # runs get MLFLOW_TRACKING_URI, MLFLOW_RUN_ID, MLFLOW_EXPERIMENT_ID
artifacts = true             # outputs/ and uploaded files go to MLflow when a run ends
max_artifact_mb = 1024       # per run
pool_size = 2                # MLflow runs made ready per busy experiment, so runs start without waiting for MLflow
pool_max_size = 16           # more where runs start faster than that many are made again, up to this
pool_max_age_seconds = 10    # one older than this is not used (MLflow would show the run started then)

[docker]
allow_pull = false           # no registry is assumed reachable
allow_host_network = false   # --network=host in DockerConfiguration.arguments
allow_host_ipc = false       # --ipc=host
volumes = ["/data"]          # host paths runs may mount with -v (resolved: links and .. cannot escape)
pids_limit = 4096            # processes and threads per container

[snapshot]
max_files = 2000             # files in one run's snapshot (Azure ML's limit)
max_bytes = "300M"           # bytes in one run's snapshot (Azure ML's limit); a number or like "2G"

[runs]
retention_days = 14          # delete run directories 14 days after the run ended (default: keep)
retention_interval = "1h"    # how often that is checked (also once at start); seconds or like "10m", "1h30m"
purge = false                # true: forget the runs too (rows, metrics); false keeps them for ls/metrics
```

Unknown sections or keys are refused at start with the key named, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import os
import pwd
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from labrun.protocol import DEFAULT_MAX_FRAME, parse_duration, parse_memory
from labrun.protocol._paths import SYSTEM_SOCKET, SYSTEM_STATE_DIR, user_socket, user_state_dir

from ._docker_args import DockerPolicy
from ._hub import HubConfig
from ._limits import LimitsConfig, load_limits
from ._mlflow import MlflowConfig
from .executors._registry import KINDS


class ConfigError(Exception):
    """The configuration file is unreadable or holds an invalid key or value."""


@dataclass
class ResourceConfig:
    cpus: int | None = None          # None: every core of the machine
    memory: int | None = None        # bytes; None: the machine's memory
    gpus: list[str] | None = None    # None: what NVML finds
    max_concurrent_runs: int = 0     # 0: no limit besides resources
    memory_enforcement: str = "auto"  # "auto": cgroups where possible, else watchdog; or "watchdog"


@dataclass
class TargetConfig:
    name: str
    kind: str = "local"
    cpus: int | None = None
    memory: int | None = None
    gpus: int | None = None
    image: str | None = None
    slurm: SlurmTargetConfig | None = None   # kind = "slurm"


@dataclass
class SlurmTargetConfig:
    """``[targets.<name>] kind = "slurm"``: where runs go, and the run directories the nodes share."""

    run_root: Path
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int | None = None          # seconds; for runs that leave max_run_duration_seconds at its default
    sbatch_args: list[str] = field(default_factory=list)
    mpi: str = "pmi2"                # srun --mpi= for MpiConfiguration runs


@dataclass
class SnapshotLimits:
    """What one run's snapshot may hold. Azure ML's limits by default; --in-place runs have none."""
    max_files: int = 2000
    max_bytes: int = 300 * 1024 * 1024


@dataclass
class RunsConfig:
    """``[runs]``: how long finished runs keep their directory."""

    retention_days: float | None = None   # None: run directories are kept until ``labrun rm``/``clean``
    retention_interval: int = 3600        # seconds between retention sweeps (one also runs at start)
    purge: bool = False                   # also forget the run (row, metrics, tags), not only its files


@dataclass
class AgentConfig:
    socket: Path
    state_dir: Path
    system: bool
    stop_grace_seconds: float = 10.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME
    socket_group: str | None = "labrun"
    admin_group: str | None = "labrun-admin"
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    targets: dict[str, TargetConfig] = field(default_factory=dict)
    retention_days: float = 30.0
    subscriber_buffer: int = 1000
    replay_max: int = 10_000
    hub: HubConfig | None = None
    docker: DockerPolicy = field(default_factory=DockerPolicy)
    docker_url: str | None = None    # None: DOCKER_HOST, else the local engine's socket
    mlflow: MlflowConfig | None = None
    snapshot: SnapshotLimits = field(default_factory=lambda: SnapshotLimits())
    runs: RunsConfig = field(default_factory=RunsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)


def _expect(value, kinds, where):
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ConfigError(f"{where}: expected {getattr(kinds, '__name__', kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise ConfigError(f"{where}: expected {getattr(kinds, '__name__', kinds)}, got {value!r}")
    return value


def _check_keys(table: dict, allowed: set[str], where: str):
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(allowed))})")


def _memory(value, where):
    try:
        return parse_memory(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_config(path: Path | None, *, socket: Path | None = None, state_dir: Path | None = None) -> AgentConfig:
    """Read the TOML file (if any) and apply command-line overrides.

    Raises:
        ConfigError: naming the file and the key.
    """
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    _check_keys(data, {"socket", "state_dir", "agent", "resources", "targets", "events", "hub", "docker", "snapshot",
                       "limits", "mlflow", "runs"}, "config")

    system = os.geteuid() == 0
    config = AgentConfig(
        socket=Path(_expect(data["socket"], str, "socket") if "socket" in data else
                    (SYSTEM_SOCKET if system else user_socket())),
        state_dir=Path(_expect(data["state_dir"], str, "state_dir") if "state_dir" in data else
                       (SYSTEM_STATE_DIR if system else user_state_dir())),
        system=system,
    )
    agent = _expect(data.get("agent", {}), dict, "[agent]")
    _check_keys(agent, {"stop_grace_seconds", "max_frame_bytes", "socket_group", "admin_group"}, "[agent]")
    if "stop_grace_seconds" in agent:
        config.stop_grace_seconds = float(_expect(agent["stop_grace_seconds"], (int, float), "agent.stop_grace_seconds"))
    if "max_frame_bytes" in agent:
        config.max_frame_bytes = _expect(agent["max_frame_bytes"], int, "agent.max_frame_bytes")
    for key in ("socket_group", "admin_group"):
        if key in agent:
            setattr(config, key, _expect(agent[key], str, f"agent.{key}") or None)

    resources = _expect(data.get("resources", {}), dict, "[resources]")
    _check_keys(resources, {"cpus", "memory", "gpus", "max_concurrent_runs", "memory_enforcement"}, "[resources]")
    if "memory_enforcement" in resources:
        config.resources.memory_enforcement = _expect(resources["memory_enforcement"], str,
                                                      "resources.memory_enforcement")
        if config.resources.memory_enforcement not in ("auto", "watchdog"):
            raise ConfigError("resources.memory_enforcement: must be 'auto' or 'watchdog'")
    if "cpus" in resources:
        config.resources.cpus = _expect(resources["cpus"], int, "resources.cpus")
        if config.resources.cpus < 1:
            raise ConfigError("resources.cpus: must be at least 1")
    if "memory" in resources:
        config.resources.memory = _memory(resources["memory"], "resources.memory")
    if "gpus" in resources:
        gpus = _expect(resources["gpus"], list, "resources.gpus")
        config.resources.gpus = [str(_expect(g, (str, int), "resources.gpus[]")) for g in gpus]
    if "max_concurrent_runs" in resources:
        config.resources.max_concurrent_runs = _expect(resources["max_concurrent_runs"], int, "resources.max_concurrent_runs")

    for name, table in _expect(data.get("targets", {}), dict, "[targets]").items():
        where = f"targets.{name}"
        _expect(table, dict, where)
        target = TargetConfig(name=name, kind=_expect(table.get("kind", "local"), str, f"{where}.kind"))
        if target.kind not in KINDS:
            raise ConfigError(f"{where}.kind: must be one of {', '.join(map(repr, KINDS))}, got {target.kind!r}")
        if target.kind == "slurm":
            target.slurm = _slurm_target(table, where)
            config.targets[name] = target
            continue
        _check_keys(table, {"kind", "cpus", "memory", "gpus", "image"}, where)
        if "cpus" in table:
            target.cpus = _expect(table["cpus"], int, f"{where}.cpus")
        if "gpus" in table:
            target.gpus = _expect(table["gpus"], int, f"{where}.gpus")
        if "memory" in table:
            target.memory = _memory(table["memory"], f"{where}.memory")
        if "image" in table:
            target.image = _expect(table["image"], str, f"{where}.image")
        config.targets[name] = target

    events = _expect(data.get("events", {}), dict, "[events]")
    _check_keys(events, {"retention_days", "subscriber_buffer", "replay_max"}, "[events]")
    if "retention_days" in events:
        config.retention_days = float(_expect(events["retention_days"], (int, float), "events.retention_days"))
    if "subscriber_buffer" in events:
        config.subscriber_buffer = _expect(events["subscriber_buffer"], int, "events.subscriber_buffer")
        if config.subscriber_buffer < 1:
            raise ConfigError("events.subscriber_buffer: must be at least 1")
    if "replay_max" in events:
        config.replay_max = _expect(events["replay_max"], int, "events.replay_max")
        if config.replay_max < 1:
            raise ConfigError("events.replay_max: must be at least 1")

    if "hub" in data:
        hub = _expect(data["hub"], dict, "[hub]")
        numbers = {"batch_max", "timeout_seconds", "retry_initial_seconds", "retry_max_seconds", "pause_seconds"}
        _check_keys(hub, {"url", "token_file", "source", *numbers}, "[hub]")
        if "url" not in hub:
            raise ConfigError("[hub]: 'url' is required")
        url = _expect(hub["url"], str, "hub.url")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"hub.url: must be an http:// or https:// URL, got {url!r}")
        config.hub = HubConfig(url=url)
        if "token_file" in hub:
            config.hub.token_file = Path(_expect(hub["token_file"], str, "hub.token_file"))
        if "source" in hub:
            config.hub.source = _expect(hub["source"], str, "hub.source")
        for key in numbers & set(hub):
            value = _expect(hub[key], (int, float), f"hub.{key}")
            if value <= 0:
                raise ConfigError(f"hub.{key}: must be positive")
            setattr(config.hub, key, int(value) if key == "batch_max" else float(value))

    docker = _expect(data.get("docker", {}), dict, "[docker]")
    _check_keys(docker, {"url", "allow_pull", "allow_host_network", "allow_host_ipc", "volumes", "pids_limit"},
                "[docker]")
    if "pids_limit" in docker:
        config.docker.pids_limit = _expect(docker["pids_limit"], int, "docker.pids_limit")
        if config.docker.pids_limit < 1:
            raise ConfigError("docker.pids_limit: must be at least 1")
    for key in ("allow_pull", "allow_host_network", "allow_host_ipc"):
        if key in docker:
            setattr(config.docker, key, _expect(docker[key], bool, f"docker.{key}"))
    if "volumes" in docker:
        config.docker.volumes = [_expect(v, str, "docker.volumes[]") for v in _expect(docker["volumes"], list, "docker.volumes")]
        bad = [v for v in config.docker.volumes if not v.startswith("/")]
        if bad:
            raise ConfigError(f"docker.volumes: {bad[0]!r} must be an absolute host path")
    if "url" in docker:
        config.docker_url = _expect(docker["url"], str, "docker.url")

    _load_snapshot(config, _expect(data.get("snapshot", {}), dict, "[snapshot]"))
    config.limits = load_limits(_expect(data.get("limits", {}), dict, "[limits]"), config.max_frame_bytes,
                                ConfigError)
    config.max_frame_bytes = config.limits.buffer_bytes_per_connection

    if "mlflow" in data:
        config.mlflow = _mlflow_config(_expect(data["mlflow"], dict, "[mlflow]"))

    runs = _expect(data.get("runs", {}), dict, "[runs]")
    _check_keys(runs, {"retention_days", "retention_interval", "purge"}, "[runs]")
    if "retention_days" in runs:
        days = float(_expect(runs["retention_days"], (int, float), "runs.retention_days"))
        if days <= 0:
            raise ConfigError(f"runs.retention_days: must be more than 0 (leave it out to keep runs), got {days}")
        config.runs.retention_days = days
    if "retention_interval" in runs:
        try:
            config.runs.retention_interval = parse_duration(runs["retention_interval"])
        except ValueError as exc:
            raise ConfigError(f"runs.retention_interval: {exc}") from None
    if "purge" in runs:
        config.runs.purge = _expect(runs["purge"], bool, "runs.purge")

    if socket is not None:
        config.socket = Path(socket)
    if state_dir is not None:
        config.state_dir = Path(state_dir)
    return config


def _slurm_target(table: dict, where: str) -> SlurmTargetConfig:
    """A ``kind = "slurm"`` target's keys; ``run_root`` is required and absolute."""
    from .executors._slurm_plan import SbatchArgumentError, check_sbatch_args, parse_time

    _check_keys(table, {"kind", "run_root", "partition", "account", "qos", "time", "sbatch_args", "mpi"}, where)
    if "run_root" not in table:
        raise ConfigError(f"{where}.run_root: required for a Slurm target (a directory every node shares)")
    run_root = _expect(table["run_root"], str, f"{where}.run_root")
    if not run_root.startswith("/"):
        raise ConfigError(f"{where}.run_root: must be an absolute path, got {run_root!r}")
    slurm = SlurmTargetConfig(run_root=Path(run_root))
    for key in ("partition", "account", "qos", "mpi"):
        if key in table:
            value = _expect(table[key], str, f"{where}.{key}")
            if not value or any(c.isspace() or c == "\0" for c in value):
                raise ConfigError(f"{where}.{key}: must be a non-empty word, got {value!r}")
            setattr(slurm, key, value)
    if "time" in table:
        try:
            slurm.time = parse_time(table["time"])
        except ValueError as exc:
            raise ConfigError(f"{where}.time: {exc}") from None
    if "sbatch_args" in table:
        arguments = [_expect(a, str, f"{where}.sbatch_args[]")
                     for a in _expect(table["sbatch_args"], list, f"{where}.sbatch_args")]
        try:
            slurm.sbatch_args = check_sbatch_args(arguments)
        except SbatchArgumentError as exc:
            raise ConfigError(f"{where}.sbatch_args: {exc}") from None
    return slurm


def _load_snapshot(config: AgentConfig, table: dict) -> None:
    _check_keys(table, {"max_files", "max_bytes"}, "[snapshot]")
    if "max_files" in table:
        config.snapshot.max_files = _expect(table["max_files"], int, "snapshot.max_files")
        if config.snapshot.max_files < 1:
            raise ConfigError("snapshot.max_files: must be at least 1")
    if "max_bytes" in table:
        config.snapshot.max_bytes = _memory(table["max_bytes"], "snapshot.max_bytes")


def _mlflow_config(table: dict) -> MlflowConfig:
    numbers = {"prepare_timeout_seconds", "timeout_seconds", "retry_initial_seconds", "retry_max_seconds",
               "pool_max_age_seconds"}
    flags = {"embedded", "run_env", "artifacts"}
    _check_keys(table, {"tracking_uri", "port", "user", "username", "password_file", "max_artifact_mb", "pool_size",
                        "pool_max_size", *numbers, *flags}, "[mlflow]")
    config = MlflowConfig()
    for key in flags & set(table):
        setattr(config, key, _expect(table[key], bool, f"mlflow.{key}"))
    if "tracking_uri" in table:
        uri = _expect(table["tracking_uri"], str, "mlflow.tracking_uri")
        if not uri.startswith(("http://", "https://")):
            raise ConfigError(f"mlflow.tracking_uri: must be an http:// or https:// URL, got {uri!r}")
        config.tracking_uri = uri.rstrip("/")
    if config.embedded == (config.tracking_uri is not None):
        raise ConfigError("[mlflow]: give either tracking_uri (an existing server) or embedded = true")
    if config.embedded:
        from ._mlflow_server import mlflow_installed

        if not mlflow_installed():
            raise ConfigError("mlflow.embedded: MLflow is not installed next to the agent; "
                              "install it with: pip install 'labrun[mlflow]'")
    if "port" in table:
        config.port = _expect(table["port"], int, "mlflow.port")
        if not 0 <= config.port <= 65535:
            raise ConfigError("mlflow.port: must be between 0 and 65535")
    if "user" in table:
        config.user = _expect(table["user"], str, "mlflow.user")
        try:
            pwd.getpwnam(config.user)
        except KeyError:
            raise ConfigError(f"mlflow.user: no account {config.user!r} on this machine") from None
    if "username" in table:
        config.username = _expect(table["username"], str, "mlflow.username")
    if "password_file" in table:
        config.password_file = Path(_expect(table["password_file"], str, "mlflow.password_file"))
    if "max_artifact_mb" in table:
        megabytes = _expect(table["max_artifact_mb"], int, "mlflow.max_artifact_mb")
        if megabytes < 0:
            raise ConfigError("mlflow.max_artifact_mb: must be at least 0")
        config.max_artifact_bytes = megabytes << 20
    if "pool_size" in table:
        config.pool_size = _expect(table["pool_size"], int, "mlflow.pool_size")
        if not 0 <= config.pool_size <= 100:
            raise ConfigError("mlflow.pool_size: must be between 0 and 100")
    if "pool_max_size" in table:
        config.pool_max_size = _expect(table["pool_max_size"], int, "mlflow.pool_max_size")
        if not config.pool_size <= config.pool_max_size <= 100:
            raise ConfigError(f"mlflow.pool_max_size: must be between pool_size ({config.pool_size}) and 100")
    else:
        config.pool_max_size = max(config.pool_size, config.pool_max_size)
    for key in numbers & set(table):
        value = _expect(table[key], (int, float), f"mlflow.{key}")
        if value <= 0:
            raise ConfigError(f"mlflow.{key}: must be positive")
        setattr(config, key, float(value))
    return config
