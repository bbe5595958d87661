"""The per-run shim: a small process that owns one local run, so the run outlives the agent.

The agent starts shims through a *forkserver*: this module run once, as root, as
``python -I -S _shim.py --forkserver SOCKET_FD`` (``serve``). The forkserver forks a shim for
each request, with a status pipe and a plan pipe attached (SCM_RIGHTS): a process in a session
of its own with this module already imported, so a run pays for a fork, not for an
interpreter's start-up. The shim joins the cgroups the request names, then waits for the run's
plan (one line of JSON) on the plan pipe. The forkserver has the kernel reap its children (the
agent waits on a shim through a pidfd, as on any process), and exits when the agent's end of its
socket closes; the shims it forked outlive it and the agent. ``python -I -S _shim.py STATUS_FD``,
with the plan on stdin, runs one shim directly.

Once it has its plan, the shim sets the run's CPU affinity (the run inherits it), then, in this
order:

1. joins the run's cgroups it is not in yet (so every process it starts is in them, whatever it
   forks), becomes a child subreaper (so a process of the run that double-forks is reparented to
   the shim, not to init), and drops to the run's user, groups and gid: everything below happens
   with the user's rights;
2. makes the run's snapshot directory where the agent left that to it (an empty one), then starts
   each rank in a session of its own, with stdout and stderr appended to the rank's log file;
3. reports its own pid and start time and the ranks' pids (or why they could not start) on the
   status pipe, one line of JSON, and closes it (the forkserver adds a line with the shim's pid);
4. waits: when a rank fails, the others are stopped; when the other ranks are done, parameter
   servers (``daemon`` ranks) are stopped; SIGTERM (the agent canceling the run) stops them all;
   "stop" is SIGTERM to every process of the run, ``grace`` seconds, then SIGKILL. Where no
   memory cgroup holds the run's memory request, a watchdog sums the run's resident memory
   twice a second and SIGKILLs the run past the limit, as the kernel would;
5. once the ranks have ended, kills what is left of the run (a daemon it started, an escaped
   double fork): the run ends with all its processes;
6. writes how the run ended to ``exit_path`` atomically (temporary file, rename) and exits; the
   temporary file is written full size when the run starts, so a disk that fills meanwhile cannot stop it.

"The processes of the run" are the members of its tracking cgroup where it has one, else the
shim's descendants and the members of the ranks' sessions and process groups.

Standard library only, and nothing imported from labrun: it must start fast, under any
interpreter the agent runs on, without the agent's packages on its path.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import socket
import struct
import sys
import time

WATCHDOG_INTERVAL = 0.5
# How long the final sweep waits for a SIGKILLed process to go before looking again.
SWEEP_PAUSE = 0.02
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NAME = 15
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
# a run is recorded even when the disk filled up while it ran. (Space is taken when a file is written,
# also where the filesystem allocates blocks later, so no fsync is needed for that.)
EXIT_RESERVE_BYTES = 4096


def reserve_exit(path: str) -> None:
    """Write the exit record's temporary file now, full size; a full disk only costs the reservation."""
    try:
        fd = os.open(f"{path}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, b" " * EXIT_RESERVE_BYTES)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_exit(path: str, record: dict) -> None:
    """Atomically: a reader sees the whole record or none. Overwrites the reservation in place.

    Not fsynced, as the agent's own commits are not (SQLite's synchronous=NORMAL): the record outlives
    the shim and the agent in the page cache; only a power cut can lose it, and the run, which ended
    with the machine then, counts as lost. Two fsyncs per run would hold each run's slot for longer
    than a short run takes.
    """
    temporary = f"{path}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        data = json.dumps(record).encode()
        os.write(fd, data)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    os.rename(temporary, path)


# -- the shim ------------------------------------------------------------------------------------

def make_empty_snapshot(path: str) -> None:
    """An empty ``snapshot/`` with its ``outputs/``, made as the run's user (what ``_snapshot.materialize``
    makes of an empty tree, left to the shim by the agent)."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:   # an earlier start of this run made it: start again
        import shutil

        shutil.rmtree(path)
        os.mkdir(path, 0o755)
    os.mkdir(os.path.join(path, "outputs"), 0o755)


def join_groups(groups: list[str]) -> None:
    for group in groups:
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))


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

    def start(self) -> None:
        """Start every rank, or none (a rank that cannot start ends those started before it)."""
        pids: list[int] = []
        if self.plan.get("empty_snapshot"):
            try:
                make_empty_snapshot(self.plan["empty_snapshot"])
            except OSError as exc:
                raise StartError(f"cannot make the run's snapshot: {exc.strerror or exc}", exc.errno) from None
        try:
            os.chdir(self.plan["cwd"])   # the ranks' working directory (posix_spawn has no chdir of its own)
        except OSError as exc:
            raise StartError(f"cannot start {self.ranks[0]['argv'][0]!r}: cannot enter {self.plan['cwd']}: "
                             f"{exc.strerror or exc}", exc.errno) from None
        try:
            for rank in self.ranks:
                log = os.open(rank["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
                try:
                    pids.append(spawn(rank["argv"], rank["env"], log))
                except OSError as exc:
                    signal_all(pids, signal.SIGKILL)
                    for pid in pids:
                        os.waitpid(pid, 0)
                    raise StartError(f"cannot start {rank['argv'][0]!r}: {exc.strerror or exc}", exc.errno) from None
                finally:
                    os.close(log)
        finally:
            os.chdir("/")
        self.pids = pids
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


# What a started process gets back to default: the shim ignores SIGHUP, and Python ignores SIGPIPE and
# SIGXFSZ (subprocess's restore_signals); an ignored signal would stay ignored across exec.
SPAWN_DEFAULT_SIGNALS = {signal.SIGHUP, signal.SIGPIPE, signal.SIGXFSZ}


def spawn(argv: list[str], env: dict[str, str], log: int) -> int:
    """Start ``argv`` in the current directory, in a session of its own, its output appended to ``log``.

    posix_spawn (a vfork, no Python code in the child): the shim's blocked signals are unblocked and its
    ignored ones restored in the child. A bare name is looked up in ``env``'s PATH, as subprocess does:
    the first candidate that runs wins, and the error of a candidate that exists (EACCES) beats ENOENT.
    """
    if os.sep in argv[0]:
        candidates = [argv[0]]
    else:
        candidates = [os.path.join(directory, argv[0]) for directory in os.get_exec_path(env)]
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_DUP2, log, 1), (os.POSIX_SPAWN_DUP2, log, 2)]
    first_error: OSError | None = None
    for path in candidates:
        try:
            return os.posix_spawn(path, argv, env, file_actions=actions, setsid=True, setsigmask=(),
                                  setsigdef=SPAWN_DEFAULT_SIGNALS)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                first_error = first_error or exc
            elif first_error is None or first_error.errno in (errno.ENOENT, errno.ENOTDIR):
                first_error = exc
    raise first_error or FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])


def _drop_privileges(plan: dict) -> None:
    uid, gid = plan.get("uid"), plan.get("gid")
    if os.geteuid() != 0 or uid is None or uid == 0:
        return
    os.setgroups(plan.get("groups") or [gid])
    os.setgid(gid)
    os.setuid(uid)


def become_shim(status: int) -> int:
    """What a shim sets up before its plan (none of it depends on the run, so a spare does it while it
    waits); returns its start time."""
    os.set_inheritable(status, False)   # the run's processes get nothing of the shim's but their logs
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # Signals are taken synchronously (sigtimedwait); the agent's stop is SIGTERM. SIGHUP and SIGINT
    # from a terminal never reach a process in its own session, but should one come, it is a stop.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT})
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    return process_start_time(os.getpid())


def run(plan: dict, status: int, join: list[str], start_time: int | None) -> int:
    """One shim, from its plan to its exit record (see the module doc); returns the shim's exit code.

    ``join``: the cgroups it joins now (those it is not in already); ``start_time``: ``become_shim``'s."""
    shim = Shim(plan)
    try:
        if plan.get("cores"):
            os.sched_setaffinity(0, plan["cores"])
        join_groups(join)
        _drop_privileges(plan)
        # Anything the shim itself has to say (a crash) goes to the run's log, opened as the run's user.
        log = os.open(plan["ranks"][0]["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        shim.start()
    except (StartError, OSError) as exc:
        _report(status, {"error": str(exc), "errno": exc.errno})
        return 127
    _report(status, {"pids": shim.pids, "shim": os.getpid(), "start_time": start_time})
    # After the report: a file creation less on the way to the run's start; the room is still taken
    # before the shim waits for the run, and its record can only be written after that wait.
    reserve_exit(plan["exit_path"])
    shim.supervise()
    shim.sweep()
    write_exit(plan["exit_path"], shim.result())
    return 0


# -- the forkserver --------------------------------------------------------------------------------

# A request: a 4-byte big-endian length, then the plan as JSON; the status pipe rides on its first bytes.
REQUEST_HEADER = struct.Struct(">I")


def _receive(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """One request (plan, fds), or None once the agent's end is closed."""
    data, fds, _, _ = socket.recv_fds(sock, REQUEST_HEADER.size, 2)
    while data and len(data) < REQUEST_HEADER.size:
        more = sock.recv(REQUEST_HEADER.size - len(data))
        if not more:
            break
        data += more
    if len(data) < REQUEST_HEADER.size:
        for fd in fds:
            os.close(fd)
        return None
    (length,) = REQUEST_HEADER.unpack(data)
    body = bytearray()
    while len(body) < length:
        more = sock.recv(min(length - len(body), 1 << 20))
        if not more:
            break
        body += more
    return bytes(body), fds


def serve(sock_fd: int) -> int:
    """Fork a shim for each request of the agent, until the agent's end of the socket closes.

    A request is ``{"cgroups": [...]}`` with two pipes attached: the status pipe's write end and the
    plan pipe's read end. The shim joins the cgroups at once, then waits for its plan on the plan pipe:
    the agent may ask for a shim before it has a run for it (``_local``'s spare), so that joining a
    cgroup, which waits for an RCU grace period of the kernel, is not on the way to a run's start.
    A plan pipe closed without a plan ends the shim.
    """
    sock = socket.socket(fileno=sock_fd)
    # The kernel reaps the shims: nothing here waits for them (the agent does, through pidfds).
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    while True:
        try:
            request = _receive(sock)
        except OSError:
            return 0
        if request is None:
            return 0
        body, fds = request
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        status, plan_fd = fds
        try:
            groups = json.loads(body)["cgroups"]
            pid = os.fork()
        except (ValueError, KeyError, TypeError, OSError) as exc:
            os.close(plan_fd)
            _report(status, {"error": f"its shim did not start: {exc}"})
            continue
        if pid == 0:
            code = 70
            try:
                sock.close()
                os.setsid()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                code = _wait_for_plan(groups, status, plan_fd)
            except BaseException:
                import traceback
                traceback.print_exc()   # the run's log, once the shim has opened it
            finally:
                os._exit(code)
        os.close(plan_fd)
        # Which process the shim is, should it never report (the agent then kills it).
        _report(status, {"shim": pid, "start_time": process_start_time(pid)})


def _wait_for_plan(groups: list[str], status: int, plan_fd: int) -> int:
    # Its command line is the forkserver's: its name (ps -o comm, top, pgrep) says what it is.
    ctypes.CDLL(None).prctl(PR_SET_NAME, b"labrun-shim", 0, 0, 0)
    try:
        join_groups(groups)
    except OSError as exc:
        _report(status, {"error": f"cannot join the run's cgroup: {exc}", "errno": exc.errno})
        return 127
    start_time = become_shim(status)
    body = bytearray()
    # The plan is one line: the shim goes on as soon as it has it, not once the agent has closed the pipe.
    while not body.endswith(b"\n") and (chunk := os.read(plan_fd, 1 << 16)):
        body += chunk
    os.close(plan_fd)
    if not body:
        return 0   # not needed after all
    plan = json.loads(body)
    return run(plan, status, plan.get("join") or [], start_time)


def _report(status: int, report: dict) -> None:
    """One line on the status pipe, and this process's end of it closed."""
    try:
        os.write(status, (json.dumps(report) + "\n").encode())
    except OSError:
        pass
    finally:
        os.close(status)


def main(argv: list[str]) -> int:
    if argv[1] == "--forkserver":
        return serve(int(argv[2]))
    plan = json.loads(sys.stdin.buffer.read())
    status = int(argv[1])
    return run(plan, status, plan.get("cgroups") or [], become_shim(status))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
