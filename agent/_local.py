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

Handle: ``{"pid": int, "start_time": int}`` (start time in clock ticks since boot,
from /proc, so a recycled pid is never mistaken for the run).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import trio

from ._executor import ExitResult, LaunchSpec, StartFailed


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

    def __init__(self):
        self._children: dict[int, subprocess.Popen] = {}

    async def start(self, launch: LaunchSpec) -> dict:
        log = os.open(launch.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        options = {}
        if os.geteuid() == 0 and launch.uid != 0:
            options = {"user": launch.uid, "group": launch.gid, "extra_groups": launch.groups}
        previous = os.sched_getaffinity(0)
        try:
            if launch.cores:
                os.sched_setaffinity(0, launch.cores)
            process = subprocess.Popen(
                launch.argv, cwd=launch.cwd, env=launch.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, close_fds=True, **options,
            )
        except OSError as exc:
            raise StartFailed(f"cannot start {launch.argv[0]!r}: {exc.strerror or exc}") from None
        finally:
            if launch.cores:
                os.sched_setaffinity(0, previous)
            os.close(log)
        self._children[process.pid] = process
        return {"pid": process.pid, "start_time": process_start_time(process.pid)}

    async def wait(self, handle: dict) -> ExitResult:
        process = self._children[handle["pid"]]
        pidfd = os.pidfd_open(process.pid)
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        returncode = process.wait()
        del self._children[process.pid]
        if returncode < 0:
            return ExitResult(signal=-returncode)
        return ExitResult(exit_code=returncode)

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
