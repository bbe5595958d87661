"""Per-run memory cgroups, where the machine lets the agent make them.

cgroup v2: when the agent's own cgroup offers the memory controller (a systemd unit
with ``Delegate=yes``, say), the agent moves itself into a leaf ``agent/`` and puts each
run in ``runs/<run id>/`` with ``memory.max``. cgroup v1: a ``labrun/<run id>/`` group
under the agent's memory-controller cgroup, with ``memory.limit_in_bytes``.

A run joins its group before its command runs: its argv is prefixed with a one-line
shell that writes its own pid to ``cgroup.procs`` and execs the command, so nothing
it forks can start outside. When no group can be made, ``detect`` returns None and the
executor falls back to a watchdog over the run's process tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("labrun.cgroups")

JOIN_AND_EXEC = 'echo $$ > "$0" && exec "$@"'


def _own_cgroup(controller: str | None) -> str | None:
    """This process's cgroup path for a v1 controller, or for v2 when ``controller`` is None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller is None and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return None


@dataclass
class MemoryCgroups:
    root: Path          # where run groups are made
    version: int

    @classmethod
    def detect(cls) -> "MemoryCgroups | None":
        for probe in (cls._detect_v2, cls._detect_v1):
            try:
                found = probe()
            except OSError as exc:
                log.info("cgroups.probe.failed", error=str(exc))
                found = None
            if found is not None:
                log.info("cgroups.memory", version=found.version, root=str(found.root))
                return found
        log.info("cgroups.memory.unavailable", fallback="watchdog")
        return None

    @classmethod
    def _detect_v2(cls) -> "MemoryCgroups | None":
        path = _own_cgroup(None)
        base = Path("/sys/fs/cgroup") / (path or "/").lstrip("/")
        controllers = base / "cgroup.controllers"
        if path is None or not controllers.exists() or "memory" not in controllers.read_text().split():
            return None
        # No process may sit in a cgroup whose children get controllers: move the agent into a leaf.
        agent = base / "agent"
        agent.mkdir(exist_ok=True)
        (agent / "cgroup.procs").write_text(str(os.getpid()))
        (base / "cgroup.subtree_control").write_text("+memory")
        runs = base / "runs"
        runs.mkdir(exist_ok=True)
        (runs / "cgroup.subtree_control").write_text("+memory")
        return cls._writable(runs, 2)

    @classmethod
    def _detect_v1(cls) -> "MemoryCgroups | None":
        path = _own_cgroup("memory")
        mount = Path("/sys/fs/cgroup/memory")
        if path is None or not mount.is_dir():
            return None
        root = mount / path.lstrip("/") / "labrun"
        root.mkdir(exist_ok=True)
        return cls._writable(root, 1)

    @classmethod
    def _writable(cls, root: Path, version: int) -> "MemoryCgroups | None":
        probe = root / f"probe-{os.getpid()}"
        try:
            probe.mkdir(exist_ok=True)
            limit = probe / ("memory.max" if version == 2 else "memory.limit_in_bytes")
            limit.write_text(str(64 << 20))
        finally:
            if probe.exists():
                probe.rmdir()
        return cls(root=root, version=version)

    def create(self, run_id: str, limit: int, uid: int, gid: int) -> Path:
        group = self.root / run_id
        group.mkdir(exist_ok=True)
        if self.version == 2:
            (group / "memory.max").write_text(str(limit))
            if (group / "memory.swap.max").exists():
                (group / "memory.swap.max").write_text("0")
        else:
            (group / "memory.limit_in_bytes").write_text(str(limit))
            memsw = group / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                try:
                    memsw.write_text(str(limit))
                except OSError:
                    pass   # swap accounting off: the plain limit still holds
        # The run writes its own pid here, as its own user.
        os.chown(group / "cgroup.procs", uid, gid)
        return group

    @staticmethod
    def join_argv(group: Path, argv: list[str]) -> list[str]:
        return ["/bin/sh", "-c", JOIN_AND_EXEC, str(group / "cgroup.procs"), *argv]

    def oom_killed(self, group: Path) -> bool:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (group / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except OSError:
            pass
        return False

    @staticmethod
    def remove(group: Path) -> None:
        try:
            group.rmdir()
        except OSError as exc:
            log.warning("cgroups.remove.failed", group=str(group), error=str(exc))
