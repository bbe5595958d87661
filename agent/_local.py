"""The local executor: a run is a process on this machine, leader of its own session.

- stdout and stderr are the run's log file itself (no pipe through the agent);
  stdin is /dev/null.
- When the agent is root and the run's owner is not, the child drops to the owner's
  uid, gid and supplementary groups before exec.
- Cores are pinned by setting the agent's own thread affinity around the spawn: the
  child inherits it at fork, so it is never briefly unpinned.
- ``stop`` sends SIGTERM to every process of the run's session and process group
  (grandchildren included), waits ``grace`` seconds, then SIGKILLs what is left.
- Exit is awaited through a pidfd, so no thread and no polling.
- A memory request is enforced by a per-run memory cgroup (``_cgroups``) where the
  machine allows one, else by a watchdog that sums the resident memory of the run's
  processes twice a second and SIGKILLs them all past the limit, as the kernel would.

Handle: ``{"pid": int, "start_time": int, "memory": int | None, "cgroup": str | None}``
(start time in clock ticks since boot, from /proc, so a recycled pid is never mistaken
for the run).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import trio

from ._cgroups import MemoryCgroups
from ._executor import ExitResult, LaunchSpec, StartFailed

WATCHDOG_INTERVAL = 0.5
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces; fields follow the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def session_processes(sid: int) -> list[int]:
    """Every live process whose session or process group is ``sid``, plus their descendants."""
    members, parents = set(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat(int(entry))
        if fields is None or fields[0] == "Z":
            continue
        pid, ppid, pgrp, session = int(entry), int(fields[1]), int(fields[2]), int(fields[3])
        parents[pid] = ppid
        if session == sid or pgrp == sid:
            members.add(pid)
    # Descendants that moved to a session of their own are still children of a member.
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in members and pid not in members:
                members.add(pid)
                grew = True
    return sorted(members)


def resident_memory(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_SIZE
        except (OSError, IndexError, ValueError):
            pass
    return total


def _signal_all(sid: int, signum: int) -> int:
    pids = session_processes(sid)
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
    return len(pids)


class LocalExecutor:
    name = "local"

    def __init__(self, cgroups: MemoryCgroups | None = None):
        self.cgroups = cgroups
        self._children: dict[int, subprocess.Popen] = {}

    async def start(self, launch: LaunchSpec) -> dict:
        argv, group = launch.argv, None
        if launch.memory is not None and self.cgroups is not None:
            group = self.cgroups.create(launch.run_id, launch.memory, launch.uid, launch.gid)
            argv = self.cgroups.join_argv(group, argv)
        log = os.open(launch.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        options = {}
        if os.geteuid() == 0 and launch.uid != 0:
            options = {"user": launch.uid, "group": launch.gid, "extra_groups": launch.groups}
        previous = os.sched_getaffinity(0)
        try:
            if launch.cores:
                os.sched_setaffinity(0, launch.cores)
            process = subprocess.Popen(
                argv, cwd=launch.cwd, env=launch.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, close_fds=True, **options,
            )
        except OSError as exc:
            if group is not None:
                self.cgroups.remove(group)
            raise StartFailed(f"cannot start {launch.argv[0]!r}: {exc.strerror or exc}") from None
        finally:
            if launch.cores:
                os.sched_setaffinity(0, previous)
            os.close(log)
        self._children[process.pid] = process
        return {"pid": process.pid, "start_time": process_start_time(process.pid), "memory": launch.memory,
                "cgroup": str(group) if group else None}

    async def wait(self, handle: dict) -> ExitResult:
        process = self._children[handle["pid"]]
        exceeded = False

        async def watchdog():
            nonlocal exceeded
            while resident_memory(session_processes(process.pid)) <= handle["memory"]:
                await trio.sleep(WATCHDOG_INTERVAL)
            exceeded = True
            _signal_all(process.pid, signal.SIGKILL)

        pidfd = os.pidfd_open(process.pid)
        try:
            async with trio.open_nursery() as nursery:
                if handle.get("memory") is not None and handle.get("cgroup") is None:
                    nursery.start_soon(watchdog)
                await trio.lowlevel.wait_readable(pidfd)
                nursery.cancel_scope.cancel()
        finally:
            os.close(pidfd)
        returncode = process.wait()
        del self._children[process.pid]
        if handle.get("cgroup"):
            group = Path(handle["cgroup"])
            exceeded = exceeded or (returncode != 0 and self.cgroups.oom_killed(group))
            self.cgroups.remove(group)
        if returncode < 0:
            return ExitResult(signal=-returncode, memory_exceeded=exceeded)
        return ExitResult(exit_code=returncode, memory_exceeded=exceeded)

    async def stop(self, handle: dict, grace: float) -> None:
        """SIGTERM the run's processes, give them ``grace`` seconds, then SIGKILL the rest."""
        sid = handle["pid"]
        if not _signal_all(sid, signal.SIGTERM):
            return
        # Zombies are not listed, so an exited leader awaiting its reaper counts as gone.
        with trio.move_on_after(grace):
            while session_processes(sid):
                await trio.sleep(0.05)
            return
        _signal_all(sid, signal.SIGKILL)

    async def recover(self, handle: dict) -> bool:
        # A process started by an earlier agent is not our child: its exit status
        # cannot be collected, so reattaching is not implemented yet.
        return False

    async def abandon(self, handle: dict, grace: float) -> None:
        """Terminate what is left of a run an earlier agent started, if it is still that run."""
        pid = handle.get("pid")
        if pid and handle.get("start_time") == process_start_time(pid):
            await self.stop(handle, grace)
        if handle.get("cgroup") and self.cgroups is not None:
            self.cgroups.remove(Path(handle["cgroup"]))
