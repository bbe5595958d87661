"""The per-run shim: a small process that owns one local run, so the run outlives the agent.

The agent starts it (as root, in a session of its own, with the run's CPU affinity) as
``python -I -S _shim.py STATUS_FD`` and writes the run's plan as JSON on its stdin. The shim
then, in this order:

1. joins the run's cgroups (so every process it starts is in them, whatever it forks), becomes
   a child subreaper (so a process of the run that double-forks is reparented to the shim, not
   to init), and drops to the run's user, groups and gid: everything below happens with the
   user's rights;
2. starts each rank in a session of its own, with stdout and stderr appended to the rank's log
   file;
3. reports the ranks' pids (or why they could not start) on STATUS_FD, and closes it;
4. waits: when a rank fails, the others are stopped; when the other ranks are done, parameter
   servers (``daemon`` ranks) are stopped; SIGTERM (the agent canceling the run) stops them all;
   "stop" is SIGTERM to every process of the run, ``grace`` seconds, then SIGKILL. Where no
   memory cgroup holds the run's memory request, a watchdog sums the run's resident memory
   twice a second and SIGKILLs the run past the limit, as the kernel would;
5. once the ranks have ended, kills what is left of the run (a daemon it started, an escaped
   double fork): the run ends with all its processes;
6. writes how the run ended to ``exit_path`` atomically (temporary file, fsync, rename) and exits; the
   temporary file is written full size when the run starts, so a disk that fills meanwhile cannot stop it.

"The processes of the run" are the members of its tracking cgroup where it has one, else the
shim's descendants and the members of the ranks' sessions and process groups.

Standard library only, and nothing imported from labrun: it must start fast, under any
interpreter the agent runs on, without the agent's packages on its path.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time

WATCHDOG_INTERVAL = 0.5
# How long the final sweep waits for a SIGKILLed process to go before looking again.
SWEEP_PAUSE = 0.02
PR_SET_CHILD_SUBREAPER = 36
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# -- /proc ---------------------------------------------------------------------------------------

def read_proc(pid: int, name: str) -> str | None:
    # A raw read: a text-mode read of a /proc file costs about ten times as much (measured).
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    raw = read_proc(pid, "stat")
    if raw is None:
        return None
    # The command name is in parentheses and may hold spaces; fields follow the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """Clock ticks since boot at which ``pid`` started (None if it is gone or a zombie)."""
    fields = proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def related_processes(sids: set[int], ancestors: set[int]) -> list[int]:
    """Live processes in one of the sessions or process groups ``sids``, or descending from ``ancestors``
    or from such a member."""
    members, parents = set(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = proc_stat(int(entry))
        if fields is None or fields[0] == "Z":
            continue
        pid, ppid, pgrp, session = int(entry), int(fields[1]), int(fields[2]), int(fields[3])
        parents[pid] = ppid
        if session in sids or pgrp in sids:
            members.add(pid)
    roots = members | ancestors
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in roots and pid not in roots:
                roots.add(pid)
                members.add(pid)
                grew = True
    return sorted(members - ancestors)


def cgroup_processes(group: str) -> list[int]:
    try:
        with open(os.path.join(group, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except OSError:
        return []


def resident_memory(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(read_proc(pid, "statm").split()[1]) * _PAGE_SIZE
        except (AttributeError, IndexError, ValueError):   # gone meanwhile (None), or an empty read
            pass
    return total


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


# -- exit records --------------------------------------------------------------------------------

# Room for the record, written when the run starts: the record then reuses these blocks, so the end of
# a run is recorded even when the disk filled up while it ran.
EXIT_RESERVE_BYTES = 4096


def reserve_exit(path: str) -> None:
    """Write the exit record's temporary file now, full size; a full disk only costs the reservation."""
    try:
        fd = os.open(f"{path}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, b" " * EXIT_RESERVE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_exit(path: str, record: dict) -> None:
    """Atomically: a reader sees the whole record or none. Overwrites the reservation in place."""
    temporary = f"{path}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        data = json.dumps(record).encode()
        os.write(fd, data)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# -- the shim ------------------------------------------------------------------------------------

class Shim:
    def __init__(self, plan: dict):
        self.plan = plan
        self.groups: list[str] = plan.get("cgroups") or []
        self.grace = float(plan.get("grace", 10.0))
        self.ranks: list[dict] = plan["ranks"]
        self.pids: list[int] = []              # by rank
        self.codes: dict[int, int] = {}        # rank index -> wait status as an exit code
        self.failed: int | None = None         # the first non-daemon rank that failed
        self.kill_at: float | None = None      # SIGKILL time of a stop in progress
        self.exceeded = False
        self.left_behind = 0   # processes of the run still there when its ranks had ended
        self.by_pid: dict[int, int] = {}

    def run_processes(self) -> list[int]:
        if self.groups:
            return [pid for pid in cgroup_processes(self.groups[0]) if pid != os.getpid()]
        return related_processes(set(self.pids), {os.getpid()})

    def join_groups(self) -> None:
        for group in self.groups:
            with open(os.path.join(group, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    def start(self) -> None:
        processes = []
        for index, rank in enumerate(self.ranks):
            log = os.open(rank["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
            try:
                processes.append(subprocess.Popen(
                    rank["argv"], cwd=self.plan["cwd"], env=rank["env"], stdin=subprocess.DEVNULL, stdout=log,
                    stderr=log, start_new_session=True, close_fds=True, preexec_fn=_unblock_signals))
            except OSError as exc:
                signal_all([p.pid for p in processes], signal.SIGKILL)
                for process in processes:
                    process.wait()
                raise StartError(f"cannot start {rank['argv'][0]!r}: {exc.strerror or exc}", exc.errno) from None
            finally:
                os.close(log)
        # Reaped below with os.waitpid: the Popen objects are kept only so they never reap.
        self._processes = processes
        self.pids = [p.pid for p in processes]
        self.by_pid = {pid: index for index, pid in enumerate(self.pids)}

    def stop(self) -> None:
        """Begin stopping the run: SIGTERM now, SIGKILL after the grace period."""
        if self.kill_at is None:
            signal_all(self.run_processes(), signal.SIGTERM)
            self.kill_at = time.monotonic() + self.grace

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.by_pid:   # else an adopted orphan of the run: reaped, nothing more
                index = self.by_pid[pid]
                self.codes[index] = os.waitstatus_to_exitcode(status)
                self._processes[index].returncode = self.codes[index]
                if self.codes[index] != 0 and self.failed is None and not self.ranks[index].get("daemon"):
                    self.failed = index
                    self.stop()

    def _workers_done(self) -> bool:
        return all(i in self.codes for i, r in enumerate(self.ranks) if not r.get("daemon"))

    def supervise(self) -> None:
        memory = self.plan.get("watchdog_memory")
        wanted = [signal.SIGCHLD, signal.SIGTERM, signal.SIGINT]
        while len(self.codes) < len(self.ranks):
            timeout = WATCHDOG_INTERVAL if memory else 3600.0
            if self.kill_at is not None:
                timeout = max(0.0, min(timeout, self.kill_at - time.monotonic()))
            info = signal.sigtimedwait(wanted, timeout)
            if info is not None and info.si_signo != signal.SIGCHLD:
                self.stop()
            self._reap()
            if self._workers_done() and len(self.codes) < len(self.ranks):
                self.stop()   # only parameter servers are left
            if self.kill_at is not None and time.monotonic() >= self.kill_at:
                signal_all(self.run_processes(), signal.SIGKILL)
                self.kill_at = time.monotonic() + self.grace   # again, should something be left
            if memory and not self.exceeded and resident_memory(self.run_processes()) > memory:
                self.exceeded = True
                signal_all(self.run_processes(), signal.SIGKILL)

    def sweep(self) -> None:
        """The ranks have ended: end whatever else of the run is left, SIGTERM first, then SIGKILL."""
        left = self.run_processes()
        if not left:
            return
        self.left_behind = len(left)
        signal_all(left, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while left and time.monotonic() < deadline:
            signal.sigtimedwait([signal.SIGCHLD], SWEEP_PAUSE)
            self._reap()
            left = self.run_processes()
        for _ in range(1000):   # bounded: a fork bomb racing the sweep is killed child by child
            if not left:
                return
            signal_all(left, signal.SIGKILL)
            signal.sigtimedwait([signal.SIGCHLD], SWEEP_PAUSE)
            self._reap()
            left = self.run_processes()

    def result(self) -> dict:
        index = self.failed if self.failed is not None else 0
        code = self.codes.get(index, 0)
        record = {"exit_code": code, "signal": None} if code >= 0 else {"exit_code": None, "signal": -code}
        return {**record, "memory_exceeded": self.exceeded, "left_behind": self.left_behind,
                "ended_at": time.time(), "ranks": [
            self.codes.get(i) for i in range(len(self.ranks))]}


class StartError(Exception):
    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


def _unblock_signals() -> None:
    # In the child, before exec: the shim's blocked signals must not stay blocked in the run.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _drop_privileges(plan: dict) -> None:
    uid, gid = plan.get("uid"), plan.get("gid")
    if os.geteuid() != 0 or uid is None or uid == 0:
        return
    os.setgroups(plan.get("groups") or [gid])
    os.setgid(gid)
    os.setuid(uid)


def main(argv: list[str]) -> int:
    status = int(argv[1])
    plan = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # Signals are taken synchronously (sigtimedwait); the agent's stop is SIGTERM. SIGHUP and SIGINT
    # from a terminal never reach a process in its own session, but should one come, it is a stop.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT})
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    shim = Shim(plan)
    try:
        shim.join_groups()
        _drop_privileges(plan)
        # Anything the shim itself has to say (a crash) goes to the run's log, opened as the run's user.
        log = os.open(plan["ranks"][0]["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        reserve_exit(plan["exit_path"])
        shim.start()
    except (StartError, OSError) as exc:
        os.write(status, (json.dumps({"error": str(exc), "errno": exc.errno}) + "\n").encode())
        return 127
    os.write(status, (json.dumps({"pids": shim.pids}) + "\n").encode())
    os.close(status)
    shim.supervise()
    shim.sweep()
    write_exit(plan["exit_path"], shim.result())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
