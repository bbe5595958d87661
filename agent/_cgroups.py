"""Per-run cgroups, where the machine lets the agent make them: containment (a run ends with all its
processes) and memory limits.

cgroup v2: when the agent's own cgroup lets it make children (a systemd unit with
``Delegate=yes``, say), the agent moves itself into a leaf ``agent/`` and puts each run in
``runs/<group>/``, with ``memory.max`` when the run asks for memory (and the memory
controller is there). cgroup v1: the run gets a group in a tracking hierarchy (``pids``,
else ``freezer``), ``labrun/<agent>/<group>/`` under the agent's own group there, and, when it
asks for memory, another in the memory hierarchy with ``memory.limit_in_bytes``, named after the run. A run's
tracking group is the spare shim's it took (``spare-*``, see ``_local``), or one named after it (``<agent>``
names the agent by its state directory, so agents sharing a hierarchy never touch each other's
groups). A group no active run owns is an orphan (a run whose agent died before recording it):
``orphans`` finds them, and the executor kills and removes them at start.

The run's shim joins its groups (as root, before it drops to the run's user and starts the
run), so nothing of the run starts outside, and a double-forked daemon in a new session is
still a member: killing the run kills every pid in its tracking group until none is left.

When no group can be made, ``detect`` says so (``containment`` is "process groups") and the
shim falls back to the run's sessions and process groups, and a watchdog for memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger("labrun.cgroups")

CGROUP_FS = Path("/sys/fs/cgroup")
V1_TRACKING = ("pids", "freezer")
# The groups of spare shims (``_local``), and of the runs that took them: ``spare-<agent>-<n>``.
SPARE_PREFIX = "spare-"


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


def _probe(root: Path, limit_file: str | None = None) -> bool:
    """True when the agent can make (and, for ``limit_file``, configure) a group under ``root``."""
    probe = root / f"probe-{os.getpid()}"
    try:
        probe.mkdir(exist_ok=True)
        if limit_file is not None:
            (probe / limit_file).write_text(str(64 << 20))
        return True
    except OSError as exc:
        log.info("cgroups.probe.failed", root=str(root), error=str(exc))
        return False
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass


@dataclass
class RunCgroups:
    version: int
    tracking: Path              # where run groups are made (v2: the only root)
    memory: Path | None = None  # v1: the memory hierarchy's root; v2: ``tracking`` when it has memory
    controllers: list[str] = field(default_factory=list)

    @classmethod
    def detect(cls, *, memory: bool = True, name: str = "agent") -> "RunCgroups | None":
        """What this machine allows; ``memory``: make memory groups too (else the watchdog enforces memory);
        ``name``: this agent's, for its v1 groups."""
        for probe in (cls._detect_v2, cls._detect_v1):
            try:
                found = probe(memory, name)
            except OSError as exc:
                log.info("cgroups.probe.failed", error=str(exc))
                found = None
            if found is not None:
                log.info("cgroups.found", containment=found.describe())
                return found
        log.info("cgroups.unavailable", fallback="process groups and a memory watchdog")
        return None

    @classmethod
    def _detect_v2(cls, memory: bool, name: str) -> "RunCgroups | None":
        # The agent's own cgroup is its own: no name needed to keep agents apart.
        path = _own_cgroup(None)
        base = CGROUP_FS / (path or "/").lstrip("/")
        controllers = base / "cgroup.controllers"
        if path is None or not controllers.exists() or not os.access(base, os.W_OK):
            return None
        available = controllers.read_text().split()
        # No process may sit in a cgroup whose children get controllers: move the agent into a leaf.
        agent = base / "agent"
        agent.mkdir(exist_ok=True)
        (agent / "cgroup.procs").write_text(str(os.getpid()))
        runs = base / "runs"
        runs.mkdir(exist_ok=True)
        with_memory = memory and "memory" in available
        if with_memory:
            (base / "cgroup.subtree_control").write_text("+memory")
            (runs / "cgroup.subtree_control").write_text("+memory")
        if not _probe(runs, "memory.max" if with_memory else None):
            return None
        return cls(version=2, tracking=runs, memory=runs if with_memory else None,
                   controllers=["memory"] if with_memory else [])

    @classmethod
    def _detect_v1(cls, memory: bool, name: str) -> "RunCgroups | None":
        tracking = None
        for controller in V1_TRACKING:
            own = _own_cgroup(controller)
            mount = CGROUP_FS / controller
            if own is None or not mount.is_dir():
                continue
            root = mount / own.lstrip("/") / "labrun" / name
            if _make(root) and _probe(root):
                tracking = root
                break
        if tracking is None:
            return None
        memory_root = None
        if memory:
            own = _own_cgroup("memory")
            root = CGROUP_FS / "memory" / (own or "/").lstrip("/") / "labrun" / name
            if own is not None and _make(root) and _probe(root, "memory.limit_in_bytes"):
                memory_root = root
        return cls(version=1, tracking=tracking, memory=memory_root,
                   controllers=[tracking.relative_to(CGROUP_FS).parts[0]] + (["memory"] if memory_root else []))

    def describe(self) -> str:
        return f"cgroup v{self.version} ({', '.join(self.controllers) or 'no controllers'})"

    # -- one run's groups ----------------------------------------------------------------

    def create(self, run_id: str, limit: int | None) -> list[str]:
        """The run's groups (tracking first); ``limit``: memory in bytes."""
        group = self.tracking / run_id
        group.mkdir(exist_ok=True)
        return self._limited(group, run_id, limit)

    def create_spare(self, name: str) -> str:
        """A tracking group for a shim that waits for its run (see ``_local``); ``claim`` gives it to the run.

        Raises:
            FileExistsError: there is one of that name (a group is never shared).
        """
        group = self.tracking / name
        group.mkdir()
        return str(group)

    def reusable(self, group: str) -> bool:
        """Whether an ended run's (empty) tracking group can be a spare's: it carries no limit and no
        count that the next run would inherit (v2 puts memory limits and OOM counts on it)."""
        return Path(group).parent == self.tracking and (self.version == 1 or self.memory is None)

    def recycle(self, group: str, name: str) -> str:
        """An ended run's empty tracking group, to be a spare's (instead of rmdir and mkdir): a spare's group, as
        it is; one ``create`` named after its run, renamed ``name``."""
        if Path(group).name.startswith(SPARE_PREFIX):
            return group
        spare = self.tracking / name
        os.rename(group, spare)
        return str(spare)

    def claim(self, spare: str, run_id: str, limit: int | None) -> list[str]:
        """The run's groups, as ``create`` makes them, with ``spare`` (and its member) as the tracking group.

        The group keeps the spare's name: renaming a cgroup waits for the kernel (here up to 17 ms, just after
        another group's change), which a run's start should not. The run's handle has its groups by path.
        """
        return self._limited(Path(spare), run_id, limit)

    def _limited(self, group: Path, run_id: str, limit: int | None) -> list[str]:
        groups = [group]
        if limit is not None and self.memory is not None:
            if self.version == 2:
                _limit(groups[0], "memory.max", limit)
                _limit(groups[0], "memory.swap.max", 0, optional=True)
            else:
                groups.append(self.memory / run_id)
                groups[1].mkdir(exist_ok=True)
                _limit(groups[1], "memory.limit_in_bytes", limit)
                _limit(groups[1], "memory.memsw.limit_in_bytes", limit, optional=True)
        return [str(g) for g in groups]

    def memory_group(self, groups: list[str]) -> Path | None:
        for group in map(Path, groups):
            if self.memory is not None and group.parent == self.memory:
                return group
        return None

    def oom_killed(self, groups: list[str]) -> bool:
        group = self.memory_group(groups)
        if group is None:
            return False
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (group / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except OSError:
            pass
        return False

    def orphans(self, owned: set[str]) -> list[list[str]]:
        """The groups whose names are not in ``owned`` (the names of the groups active runs hold), by name."""
        found: dict[str, list[str]] = {}
        for root in dict.fromkeys(r for r in (self.tracking, self.memory) if r is not None):
            try:
                entries = list(root.iterdir())
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir() and not entry.name.startswith("probe-") and entry.name not in owned:
                    found.setdefault(entry.name, []).append(str(entry))
        return list(found.values())

    def remove_roots(self) -> None:
        """At the agent's exit: its v1 roots, when no run is left in them (the next agent makes them again)."""
        if self.version == 1:
            for root in (self.tracking, self.memory):
                try:
                    if root is not None:
                        root.rmdir()
                except OSError:
                    pass   # runs are still in it: they outlive the agent

    @staticmethod
    def remove(groups: list[str]) -> None:
        for group in groups:
            try:
                Path(group).rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cgroups.remove.failed", group=group, error=str(exc))


def _make(root: Path) -> bool:
    try:
        root.mkdir(parents=True, exist_ok=True)
        return True
    except OSError as exc:
        log.info("cgroups.mkdir.failed", root=str(root), error=str(exc))
        return False


def _limit(group: Path, name: str, value: int, optional: bool = False) -> None:
    try:
        (group / name).write_text(str(value))
    except OSError:
        if not optional:
            raise   # an optional one: swap accounting off, and the plain limit still holds
