"""labrun's benchmarks, side by side with what users would pick instead, in the same run on the same machine.

Prints a Markdown table and writes it to bench/results/latest.md. Nothing here is a test: the numbers
are measurements, reported as medians and p95 with the ratio to the reference measured in the same run.

    python bench/run.py [--quick]

References: task-spooler (``tsp``), the floor (a plain fork/exec of the same command from Python),
``docker run`` when an engine answers, and Slurm's ``sbatch --wrap`` when a single-node Slurm is up.
Each section starts its own agent (or ``tsp`` server) on a temporary socket and cleans up after itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "latest.md"
# The console script the wheel installed, as users run it.
CLI = [str(Path(sys.executable).parent / "labrun")] if (Path(sys.executable).parent / "labrun").exists() else \
    [sys.executable, "-m", "labrun.cli"]


# -- helpers ---------------------------------------------------------------------------------

def median_p95(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_for_socket(path: Path, timeout: float) -> bool:
    """Whether a connection to the Unix socket ``path`` succeeds within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
            return True
        except OSError:
            time.sleep(0.02)
        finally:
            probe.close()
    return False


class Agent:
    """A labrund on a temporary socket and state directory."""

    def __init__(self, root: Path, config: str = ""):
        self.root = root
        self.socket = root / "agent.sock"
        self.state = root / "state"
        (root / "agent.toml").write_text(config)
        self.env = dict(os.environ, LABRUN_SOCKET=str(self.socket), LABRUN_NO_AUTOSTART="1")
        self.process = None

    def start(self) -> "Agent":
        log = open(self.root / "agent.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "labrun.agent", "--socket", str(self.socket),
                                         "--state-dir", str(self.state), "--config", str(self.root / "agent.toml"),
                                         "--log-level", "warning"], stdout=log, stderr=log, env=self.env)
        log.close()
        if not wait_for_socket(self.socket, 30):
            raise RuntimeError("agent did not start")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            # Runs outlive their agent by design: cancel what is still queued or running first, so that the
            # benchmark leaves no process behind.
            listing = subprocess.run([*CLI, "ls", "-x", "--json"], env=self.env, capture_output=True, text=True)
            if listing.returncode == 0:
                active = [run["run_id"] for run in json.loads(listing.stdout)
                          if run["status"] not in ("Completed", "Failed", "Canceled")]
                if active:
                    subprocess.run([*CLI, "cancel", *active], env=self.env, capture_output=True)
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def workspace(self):
        from labrun import Workspace

        return Workspace(socket=self.socket)


def tsp_env(root: Path) -> dict:
    return dict(os.environ, TS_SOCKET=str(root / "tsp.sock"), TMPDIR=str(root))


def read_stamp(path: Path, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text().strip()
            if text:
                return float(text)
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    raise RuntimeError(f"no timestamp in {path}")


def read_mtime(path: Path, timeout: float = 60) -> float:
    """When a file was created, by the host's clock (busybox's date has no nanoseconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return path.stat().st_mtime
        except FileNotFoundError:
            time.sleep(0.0005)
    raise RuntimeError(f"{path} never appeared")


def stamp_command(path: Path) -> str:
    return f"date +%s.%N > {path}"


# -- 1. submit-to-start latency ----------------------------------------------------------------

def latency(root: Path, n: int) -> list[tuple]:
    """Submit-to-start through the client, the CLI, task-spooler and a bare fork/exec, one of each per round."""
    from labrun import Experiment, ScriptRunConfig

    rows = []
    source = make_tree(root / "src", 60, 1024)
    (root / "lat").mkdir()
    agent = Agent(root / "lat").start()
    env = tsp_env(root)
    have_tsp = shutil.which("tsp") is not None
    client, cli, tsp_times, floor = [], [], [], []
    try:
        experiment = Experiment(agent.workspace(), "bench")
        experiment.workspace.connection   # connect once, like a long-lived client
        # After its first submit: the agent has the tree's contents and the client its hashes.
        experiment.workspace.wait_for_run(experiment.submit(ScriptRunConfig(str(source), command=["true"])).id)
        for i in range(n):
            stamp = root / f"c{i}"
            t0 = time.time()
            run = experiment.submit(ScriptRunConfig(str(source), command=stamp_command(stamp)))
            client.append(read_stamp(stamp) - t0)
            experiment.workspace.wait_for_run(run.id)

            stamp = root / f"l{i}"
            t0 = time.time()
            subprocess.run([*CLI, "submit", "--source-dir", str(source), "--",
                            stamp_command(stamp)], env=agent.env, check=True, capture_output=True)
            cli.append(read_stamp(stamp) - t0)

            if have_tsp:
                stamp = root / f"t{i}"
                t0 = time.time()
                job = subprocess.run(["tsp", "sh", "-c", stamp_command(stamp)], env=env, check=True,
                                     capture_output=True, text=True).stdout.strip()
                tsp_times.append(read_stamp(stamp) - t0)
                subprocess.run(["tsp", "-w", job], env=env, capture_output=True)

            stamp = root / f"f{i}"
            t0 = time.time()
            subprocess.Popen(["sh", "-c", stamp_command(stamp)]).wait()
            floor.append(read_stamp(stamp) - t0)
    finally:
        agent.stop()
        if have_tsp:
            subprocess.run(["tsp", "-K"], env=env, capture_output=True)

    reference = median_p95(tsp_times)[0] if tsp_times else None
    for name, values, target in (("submit-to-start, Python client, 60-file tree after its first submit", client, 1.5),
                                 ("submit-to-start, CLI (`labrun submit`, same tree)", cli, 10.0)):
        med, p95 = median_p95(values)
        rows.append((name, f"{ms(med)} (p95 {ms(p95)})",
                     f"tsp {ms(reference)}" if reference else "tsp not available",
                     f"{med / reference:.2f}x" if reference else "-", f"<= {target:g}x tsp",
                     verdict(med / reference <= target) if reference else "-"))
    med, p95 = median_p95(floor)
    rows.append(("submit-to-start, floor (fork/exec from Python)", f"{ms(med)} (p95 {ms(p95)})", "-", "-", "-", "-"))
    if tsp_times:
        med, p95 = median_p95(tsp_times)
        rows.append(("submit-to-start, task-spooler (`tsp`)", f"{ms(med)} (p95 {ms(p95)})", "-", "-", "-", "-"))
    return rows


def verdict(ok: bool) -> str:
    return "meets target" if ok else "**slower than target**"


# -- 1b. snapshots ----------------------------------------------------------------------------

def creation_time(root: Path, name: str, files: int = 200) -> float:
    """Median seconds to create an empty file in a fresh directory under ``root``: the disk's cost of a new inode.

    It varies from minute to minute on a shared machine. On ext4 without a journal it grows after deletions, for
    30 s: a new inode skips each one deleted that recently (the kernel's ``recently_deleted``), so every section
    that creates files (snapshots, run directories and logs, ``cp -a``, task-spooler's output files) pays for what
    was deleted just before it.
    """
    directory = root / name
    directory.mkdir()
    times = []
    for i in range(files):
        t0 = time.perf_counter()
        os.close(os.open(directory / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_tree(path: Path, files: int, size: int) -> Path:
    """A source tree of ``files`` files of ``size`` random bytes, in directories of 50."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        directory = path / f"d{i // 50}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{i}.py").write_bytes(os.urandom(size))
    return path


class SentBytes:
    """Counts the content bytes a workspace's connection uploads, or passes to the agent as open files."""

    def __init__(self, workspace):
        self.bytes = 0
        connection = workspace.connection
        original, passing = connection.call, connection.call_passing

        def call(op, **args):
            if op == "blob_put":
                self.bytes += sum(len(b["data"]) for b in args["blobs"])
            return original(op, **args)

        def call_passing(op, fds, **args):
            result = passing(op, fds, **args)
            self.bytes += sum(f["size"] for f in result["files"])
            return result

        connection.call, connection.call_passing = call, call_passing


def snapshots(root: Path, rounds: int, repeats: int) -> list[tuple]:
    """First and repeated submits of three trees, each round interleaved with ``cp -a`` of the same tree.

    The runs queue behind a run that holds the only CPU, so what is measured is the submit alone
    (a run's copy of its snapshot is made when it starts).

    A copy of a large tree starts with nothing left to write to the disk (``sync``): the agent keeps what it
    stores while ``cp -a``'s copy is deleted each round, and on a disk slower than memory, data still to be
    written slows whoever writes next (here, 400 MB of it slowed every further 200 MB write from 60 to 480 ms).
    Small trees leave little to write, and a ``sync`` would slow the next creation of many files instead (the
    journal's commit, with the freed blocks it discards, is still under way).
    """
    from labrun import Experiment, ScriptRunConfig

    (root / "snap").mkdir()
    agent = Agent(root / "snap", "[resources]\ncpus = 1\n").start()
    rows = []
    try:
        workspace = agent.workspace()
        experiment = Experiment(workspace, "bench")
        experiment.submit(ScriptRunConfig(str(root / "empty"), command=["sleep", "3600"]))
        sent = SentBytes(workspace)
        kinds = [("60 files of 1 KiB", 60, 1024, None), ("2,000 files of 2 KiB", 2000, 2048, 0.020),
                 ("one 200 MB file", 1, 200 * 1000 * 1000, 0.020)]
        for label, count, size, repeat_target in kinds:
            first, repeated, copies, resent = [], [], [], 0
            for r in range(rounds):
                tree = make_tree(root / f"tree-{count}-{r}", count, size)
                time.sleep(0.2)   # a tree is not submitted within a clock tick of its last edit
                copy = root / f"copy-{count}-{r}"
                settle = os.sync if count * size >= 64 << 20 else (lambda: None)

                def cp():
                    settle()
                    t0 = time.perf_counter()
                    subprocess.run(["cp", "-a", str(tree), str(copy)], check=True)
                    copies.append(time.perf_counter() - t0)

                def submit():
                    settle()
                    t0 = time.perf_counter()
                    experiment.submit(ScriptRunConfig(str(tree), command=["true"]))
                    first.append(time.perf_counter() - t0)

                for step in ((cp, submit) if r % 2 == 0 else (submit, cp)):   # neither always goes first
                    step()
                for _ in range(repeats):
                    before = sent.bytes
                    t0 = time.perf_counter()
                    experiment.submit(ScriptRunConfig(str(tree), command=["true"]))
                    repeated.append(time.perf_counter() - t0)
                    resent += sent.bytes - before
                # Trees of many files stay until the benchmark ends: on ext4 without a journal, creating a file skips
                # the inodes deleted in the last 30 s one by one (``creation_time``), so deleting them here would slow
                # the next round's copies and submits by the disk's state, not labrun's. A large file goes at once:
                # one inode, and the blocks the next round's writes would otherwise have to find elsewhere.
                if count * size >= 64 << 20:
                    shutil.rmtree(tree)
                    shutil.rmtree(copy)
            reference = statistics.median(copies)
            med, p95 = median_p95(first)
            rows.append((f"first submit, {label}", f"{ms(med)} (p95 {ms(p95)})", f"`cp -a` {ms(reference)}",
                         f"{med / reference:.2f}x", "<= 1.5x `cp -a`", verdict(med / reference <= 1.5)))
            med, p95 = median_p95(repeated)
            target = f"<= {repeat_target * 1000:.0f} ms" if repeat_target else "-"
            ok = med <= repeat_target if repeat_target else None
            if count == 1:
                target += ", 0 bytes resent"
                ok = ok and resent == 0
            rows.append((f"repeated submit, {label} (unchanged)", f"{ms(med)} (p95 {ms(p95)}), {resent} bytes resent",
                         f"`cp -a` {ms(reference)}", f"{med / reference:.2f}x", target,
                         verdict(ok) if ok is not None else "-"))
    finally:
        agent.stop()
    return rows


# -- 1c. the CLI ------------------------------------------------------------------------------

def cli_rate(root: Path, n: int) -> list[tuple]:
    """Serial `labrun submit` against serial `tsp` submits, both queueing behind a job that holds the slot."""
    (root / "rate").mkdir()
    source = make_tree(root / "rate-src", 60, 1024)
    agent = Agent(root / "rate", "[resources]\ncpus = 1\n").start()
    labrun_times, tsp_times = [], []
    env = tsp_env(root)
    have_tsp = shutil.which("tsp") is not None
    try:
        submit = [*CLI, "submit", "--source-dir", str(source), "--"]
        subprocess.run([*submit, "sleep", "3600"], env=agent.env, check=True, capture_output=True)
        if have_tsp:
            subprocess.run(["tsp", "sleep", "3600"], env=env, check=True, capture_output=True)
        for _ in range(n):   # interleaved, one of each at a time
            t0 = time.perf_counter()
            subprocess.run([*submit, "true"], env=agent.env, check=True, capture_output=True)
            labrun_times.append(time.perf_counter() - t0)
            if have_tsp:
                t0 = time.perf_counter()
                subprocess.run(["tsp", "true"], env=env, check=True, capture_output=True)
                tsp_times.append(time.perf_counter() - t0)
    finally:
        agent.stop()
        if have_tsp:
            subprocess.run(["tsp", "-K"], env=env, capture_output=True)
    rate = 1 / statistics.median(labrun_times)
    tsp_rate = 1 / statistics.median(tsp_times) if tsp_times else None
    return [("CLI serial submits (`labrun submit`, 60-file tree)", f"{rate:.0f} submits/s",
             f"`tsp` {tsp_rate:.0f} submits/s" if tsp_rate else "tsp not available",
             f"{rate / tsp_rate:.2f}x" if tsp_rate else "-", "-", "-")]


def import_times(env: dict, argv: list[str]) -> dict[str, int]:
    """{top-level module: cumulative microseconds} of one process, from ``-X importtime``."""
    result = subprocess.run(argv, env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, capture_output=True, text=True)
    times = {}
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|")
            if not name.startswith("  ") and cumulative.strip().isdigit():
                times[name.strip()] = int(cumulative)
    return times


def cli_imports(root: Path, n: int) -> list[tuple]:
    """What the CLI imports beyond the interpreter's own start-up, and the wall time of the floor."""
    (root / "imp").mkdir()
    source = make_tree(root / "imp-src", 60, 1024)
    agent = Agent(root / "imp").start()
    floor, cli_ms, modules = [], [], {}
    try:
        argv = [*CLI, "submit", "--source-dir", str(source), "--", "true"]
        subprocess.run(argv, env=agent.env, check=True, capture_output=True)   # the agent has the tree now
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            floor.append(time.perf_counter() - t0)
            baseline = import_times(os.environ, [sys.executable, "-c", "pass"])
            submit = import_times(agent.env, argv)   # the installed command, its own script's imports included
            extra = {k: v for k, v in submit.items() if k not in baseline}
            cli_ms.append(sum(extra.values()) / 1000)
            modules = extra
    finally:
        agent.stop()
    heaviest = ", ".join(f"{name} {us / 1000:.1f}" for name, us in sorted(modules.items(), key=lambda kv: -kv[1])[:5])
    return [("CLI import time, `labrun submit` (`-X importtime`, beyond start-up)",
             f"{statistics.median(cli_ms):.1f} ms (heaviest, ms: {heaviest})", "-", "-", "-", "-"),
            ("interpreter start-up (`python -c pass`)", ms(statistics.median(floor)), "-", "-", "-", "-")]


# -- 2. throughput -----------------------------------------------------------------------------

def throughput(root: Path, n: int, rounds: int = 2) -> list[tuple]:
    """Trivial runs, two at a time: labrun and task-spooler in alternating rounds of ``n // rounds`` runs each."""
    from labrun import Experiment, ScriptRunConfig

    (root / "thr").mkdir()
    source = root / "empty"
    agent = Agent(root / "thr", "[resources]\nmax_concurrent_runs = 2\n").start()
    env = tsp_env(root)
    have_tsp = shutil.which("tsp") is not None
    per_round = n // rounds
    labrun_rates, tsp_rates, submitting = [], [], []
    try:
        experiment = Experiment(agent.workspace(), "bench")
        if have_tsp:
            subprocess.run(["tsp", "-S", "2"], env=env, check=True, capture_output=True)
        for _ in range(rounds):
            t0 = time.time()
            ids = [experiment.submit(ScriptRunConfig(str(source), command=["true"])).id for _ in range(per_round)]
            submitting.append(time.time() - t0)
            for run_id in ids:
                experiment.workspace.wait_for_run(run_id)
            labrun_rates.append(per_round / (time.time() - t0))
            if have_tsp:
                t0 = time.time()
                jobs = [subprocess.run(["tsp", "true"], env=env, check=True, capture_output=True,
                                       text=True).stdout.strip() for _ in range(per_round)]
                for job in jobs:
                    subprocess.run(["tsp", "-w", job], env=env, capture_output=True)
                tsp_rates.append(per_round / (time.time() - t0))
    finally:
        agent.stop()
        if have_tsp:
            subprocess.run(["tsp", "-K"], env=env, capture_output=True)

    t0 = time.time()
    running = []
    for _ in range(n):
        if len(running) == 2:
            running.pop(0).wait()
        running.append(subprocess.Popen(["true"]))
    for process in running:
        process.wait()
    floor_rate = n / (time.time() - t0)
    labrun_rate = statistics.median(labrun_rates)
    tsp_rate = statistics.median(tsp_rates) if tsp_rates else None
    rows = [(f"throughput, {n} trivial runs, 2 at a time ({rounds} rounds, alternating)", f"{labrun_rate:.0f} runs/s "
             f"(submitting {per_round} took {statistics.median(submitting):.1f} s)",
             f"tsp {tsp_rate:.0f} runs/s" if tsp_rate else "tsp not available",
             f"{labrun_rate / tsp_rate:.2f}x" if tsp_rate else "-", ">= 1x tsp",
             verdict(labrun_rate >= tsp_rate) if tsp_rate else "-"),
            ("throughput, floor (fork/exec, 2 at a time)", f"{floor_rate:.0f} runs/s", "-", "-", "-", "-")]
    return rows


# -- 3. log capture ------------------------------------------------------------------------------

def log_capture(root: Path, size_mib: int, rounds: int = 2) -> list[tuple]:
    """Interleaved rounds, each after a sync, so neither side pays for the other's writeback."""
    from labrun import Experiment, ScriptRunConfig

    (root / "log").mkdir()
    command = f"head -c {size_mib}M /dev/zero"
    target = root / "direct.out"
    agent = Agent(root / "log").start()
    labrun_times, direct_times = [], []
    try:
        experiment = Experiment(agent.workspace(), "bench")
        for _ in range(rounds):
            subprocess.run(["sync"], check=True)
            t0 = time.time()
            subprocess.run(f"{command} > {target}", shell=True, check=True)
            direct_times.append(time.time() - t0)
            target.unlink()
            subprocess.run(["sync"], check=True)
            t0 = time.time()
            run = experiment.submit(ScriptRunConfig(str(root / "empty"), command=command))
            experiment.workspace.wait_for_run(run.id)
            labrun_times.append(time.time() - t0)
            log = agent.state / "runs" / run.id / "logs" / "std_log.txt"
            assert log.stat().st_size == size_mib << 20, "the log holds every byte"
            log.unlink()
    finally:
        agent.stop()
    labrun_rate, direct_rate = size_mib / statistics.median(labrun_times), size_mib / statistics.median(direct_times)
    ratio = labrun_rate / direct_rate
    return [(f"log capture, {size_mib} MiB to stdout (submit to done)", f"{labrun_rate:.0f} MiB/s",
             f"direct write {direct_rate:.0f} MiB/s", f"{ratio:.2f}x", ">= 0.95x", verdict(ratio >= 0.95))]


# -- 4. footprint --------------------------------------------------------------------------------

def footprint(root: Path, queued: int, finished: int) -> list[tuple]:
    from labrun import Experiment, ScriptRunConfig

    (root / "fp").mkdir()
    agent = Agent(root / "fp", "[resources]\ncpus = 1\n").start()
    rows = []
    try:
        time.sleep(0.5)
        idle = rss_mib(agent.process.pid)
        rows.append(("agent resident memory, idle", f"{idle:.1f} MiB", "-", "-", "< 35 MiB", verdict(idle < 35)))
        workspace = agent.workspace()
        experiment = Experiment(workspace, "bench")
        experiment.submit(ScriptRunConfig(str(root / "empty"), command=["sleep", "600"]))
        for _ in range(queued):
            experiment.submit(ScriptRunConfig(str(root / "empty"), command=["true"]))
        rows.append((f"agent resident memory, {queued} runs queued", f"{rss_mib(agent.process.pid):.1f} MiB",
                     "-", "-", "-", "-"))
        t0 = time.time()
        subprocess.run([*CLI, "ls"], env=agent.env, check=True, capture_output=True)
        rows.append((f"`labrun ls` with {queued} queued", ms(time.time() - t0), "-", "-", "-", "-"))
    finally:
        agent.stop()
    # History, on a fresh state: finished runs are written straight into the store (running 100,000
    # real runs would take longer than the whole benchmark); an agent then starts on that state.
    (root / "hist").mkdir()
    agent = Agent(root / "hist")
    agent.start()
    agent.stop()
    add_finished_history(agent.state / "state.db", finished)
    agent.start()
    try:
        time.sleep(0.5)
        rows.append((f"agent resident memory, {finished} finished runs in history",
                     f"{rss_mib(agent.process.pid):.1f} MiB", "-", "-", "-", "-"))
        for args, label in ((["ls"], "`labrun ls`"), (["ls", "--all", "--json"], "`labrun ls --all --json`"),
                            (["show", "hist_1_00000001"], "`labrun show` (a get)")):
            t0 = time.time()
            subprocess.run([*CLI, *args], env=agent.env, check=True,
                           capture_output=True)
            rows.append((f"{label} with {finished} runs in history", ms(time.time() - t0), "-", "-", "-", "-"))
    finally:
        agent.stop()
    return rows


def add_finished_history(db: Path, count: int) -> None:
    import msgpack

    spec = msgpack.packb({"experiment": "hist", "display_name": None, "script": None, "arguments": [],
                          "command": ["true"], "interpreter": None, "environment_variables": {},
                          "max_run_duration_seconds": 2592000, "tags": {}, "properties": {},
                          "resources": {"cpus": 1, "memory": None, "gpus": 0}, "priority": 0,
                          "compute_target": "local", "environment": None, "distributed": None,
                          "resume_from": None, "docker": None})
    now = time.time()
    with sqlite3.connect(db) as connection:
        base = connection.execute("SELECT COALESCE(MAX(ord), 0) FROM runs").fetchone()[0]
        connection.executemany(
            "INSERT INTO runs (run_id, ord, experiment, number, uid, gid, user, status, spec, environ, "
            "submitted_at, started_at, ended_at, exit_code) VALUES (?, ?, 'hist', ?, 0, 0, 'root', 'Completed', "
            "?, ?, ?, ?, ?, 0)",
            [(f"hist_{i}_{i:08d}", base + i, i, spec, msgpack.packb({}), now, now, now) for i in range(1, count + 1)])


# -- 5. docker -----------------------------------------------------------------------------------

def docker_latency(root: Path, n: int) -> list[tuple]:
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return [("Docker submit-to-start", "no Docker engine here", "-", "-", "-", "-")]
    from labrun import DockerConfiguration, Environment, Experiment, ScriptRunConfig

    image = "labrun-bench-busybox:2"   # the tag names the tools inside
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
        busybox = shutil.which("busybox")
        if busybox is None:
            return [("Docker submit-to-start", "busybox-static is not installed", "-", "-", "-", "-")]
        rootfs = root / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy(busybox, rootfs / "bin" / "busybox")
        for tool in ("sh", "touch", "true"):
            (rootfs / "bin" / tool).symlink_to("busybox")
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True).stdout
        subprocess.run(["docker", "import", "-", image], input=tar, check=True, capture_output=True)
    (root / "dk").mkdir()
    shared = root / "dk" / "out"
    shared.mkdir()
    agent = Agent(root / "dk").start()
    labrun_times, docker_times = [], []
    try:
        experiment = Experiment(agent.workspace(), "bench")
        env = Environment.from_docker_image("bb", image)
        for i in range(n):
            t0 = time.time()
            run = experiment.submit(ScriptRunConfig(str(root / "empty"), command=["touch", "outputs/t"],
                                                    environment=env, docker_runtime_config=DockerConfiguration(use_docker=True)))
            labrun_times.append(read_mtime(agent.state / "runs" / run.id / "outputs" / "t") - t0)
            experiment.workspace.wait_for_run(run.id)
    finally:
        agent.stop()
    for i in range(n):
        t0 = time.time()
        subprocess.run(["docker", "run", "--rm", "-v", f"{shared}:{shared}", image, "touch", f"{shared}/t{i}"],
                       check=True, capture_output=True)
        docker_times.append(read_mtime(shared / f"t{i}") - t0)
    med, p95 = median_p95(labrun_times)
    reference = median_p95(docker_times)[0]
    return [("Docker submit-to-start", f"{ms(med)} (p95 {ms(p95)})", f"docker run {ms(reference)}",
             f"{med / reference:.2f}x", "-", "-")]


# -- 6. slurm ------------------------------------------------------------------------------------

# The Slurm target's goal: labrun adds at most 50 ms to sbatch's submit-to-start, or 1.1x, whichever is larger.
SLURM_ADDED_SECONDS = 0.050
SLURM_RATIO = 1.1


def _node_idle(phase: float, timeout: float = 60) -> None:
    """Wait for an idle node, then for the next moment at ``phase`` of a second.

    slurmctld starts pending batch jobs on a one-second tick, so a job's wait for it depends on when in the second
    it was submitted. Each labrun run and its ``sbatch`` twin are submitted at the same, random, phase: the tick
    then costs both the same, and their difference is what labrun adds.
    """
    deadline = time.monotonic() + timeout
    while subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split() != ["idle"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the Slurm node did not become idle")
        time.sleep(0.05)
    now = time.time()
    time.sleep((phase - now % 1.0) % 1.0)


def _cluster() -> str:
    """The cluster measured: its nodes and scheduler settings (they set the pace of a batch job's start)."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    params = next((line.split("=", 1)[1].strip() for line in config.splitlines()
                   if line.startswith("SchedulerParameters")), "?")
    nodes = len(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split())
    return f"{nodes} node(s), SchedulerParameters={params}"


def _sbatch_returned(workspace, run_id: str) -> float:
    """When the agent's sbatch returned: the run's second ``run.queued`` event (Preparing -> Queued in Slurm)."""
    queued = []
    for event in workspace.watch(since=0, run_id=run_id):
        if event.get("type") == "run.queued":
            queued.append(event["time"])
        if event.get("type") in ("run.completed", "run.failed", "run.canceled"):
            return queued[1]
    raise RuntimeError(f"run {run_id} has no end in its events")


def slurm(root: Path, n: int) -> list[tuple]:
    """labrun on a Slurm target against a plain ``sbatch --wrap``, alternating, on the same cluster."""
    from labrun import Experiment, ScriptRunConfig

    if shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        return [("Slurm `sbatch --wrap`", "no single-node Slurm answers here "
                 "(scripts/slurm-single-node.sh sets one up)", "-", "-", "-", "-")]
    source, run_root = root / "slurm-src", root / "slurm-runs"
    source.mkdir()
    run_root.mkdir()
    (root / "slurm-agent").mkdir()
    agent = Agent(root / "slurm-agent", f'[targets.cluster]\nkind = "slurm"\nrun_root = "{run_root}"\n').start()
    labrun_times, sbatch_times, labrun_submit, sbatch_submit = [], [], [], []
    try:
        experiment = Experiment(agent.workspace(), "bench")
        experiment.workspace.connection   # connect once, like a long-lived client
        for i in range(n):
            phase = random.random()
            _node_idle(phase)
            stamp = root / f"sl{i}"
            t0 = time.time()
            config = ScriptRunConfig(str(source), command=stamp_command(stamp), compute_target="cluster")
            run = experiment.submit(config)
            labrun_times.append(read_stamp(stamp, timeout=120) - t0)
            experiment.workspace.wait_for_run(run.id)
            labrun_submit.append(_sbatch_returned(experiment.workspace, run.id) - t0)
            _node_idle(phase)
            stamp = root / f"s{i}"
            t0 = time.time()
            job = subprocess.run(["sbatch", "--parsable", "--wrap", stamp_command(stamp), "-o", "/dev/null"],
                                 check=True, capture_output=True, text=True).stdout.strip()
            sbatch_submit.append(time.time() - t0)
            sbatch_times.append(read_stamp(stamp, timeout=120) - t0)
            while subprocess.run(["squeue", "-h", "-j", job, "-t", "PD,CF,R,CG", "-o", "%i"], capture_output=True,
                                 text=True).stdout.strip():
                time.sleep(0.05)   # one job at a time, as the labrun run above
    finally:
        agent.stop()
    med, p95 = median_p95(labrun_times)
    reference, ref_p95 = median_p95(sbatch_times)
    added = statistics.median(a - b for a, b in zip(labrun_times, sbatch_times))   # paired: same tick phase
    allowed = max(SLURM_ADDED_SECONDS, reference * (SLURM_RATIO - 1))
    submit_med, submit_p95 = median_p95(labrun_submit)
    sbatch_med, sbatch_p95 = median_p95(sbatch_submit)
    return [("submit-to-start, Slurm target (Python client)", f"{ms(med)} (p95 {ms(p95)})",
             f"sbatch --wrap {ms(reference)}", f"{med / reference:.2f}x; adds {ms(added)} (median of pairs)",
             "adds <= 50 ms or 0.1x", verdict(added <= allowed)),
            ("submit-to-start, Slurm `sbatch --wrap`", f"{ms(reference)} (p95 {ms(ref_p95)})", _cluster(), "-", "-",
             "-"),
            ("submit until the job is in Slurm's queue: labrun client -> agent -> sbatch returned",
             f"{ms(submit_med)} (p95 {ms(submit_p95)})", f"sbatch {ms(sbatch_med)} (p95 {ms(sbatch_p95)})",
             f"+{ms(submit_med - sbatch_med)}", "-", "-")]


# -- main ----------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of under two minutes, with smaller sizes")
    parser.add_argument("--only", help="comma-separated sections to run (latency, snapshots, cli rate, ...); "
                                       "the results file is written only for a full run")
    args = parser.parse_args()
    sizes = dict(latency=15, throughput=200, log_mib=256, queued=1000, finished=20000, docker=5, rounds=2, repeats=3,
                 cli=10) if args.quick else \
        dict(latency=60, throughput=1000, log_mib=1024, queued=10000, finished=100000, docker=20, rounds=4, repeats=5,
             cli=30)
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="labrun-bench-") as tmp:
        root = Path(tmp)
        (root / "empty").mkdir()   # the source directory of trivial runs
        sections = [
            ("latency", lambda: latency(root, sizes["latency"])),
            ("snapshots", lambda: snapshots(root, sizes["rounds"], sizes["repeats"])),
            ("cli rate", lambda: cli_rate(root, sizes["cli"])),
            ("cli imports", lambda: cli_imports(root, min(sizes["cli"], 10))),
            ("throughput", lambda: throughput(root, sizes["throughput"])),
            ("log capture", lambda: log_capture(root, sizes["log_mib"])),
            ("footprint", lambda: footprint(root, sizes["queued"], sizes["finished"])),
            ("docker", lambda: docker_latency(root, sizes["docker"])),
            ("slurm", lambda: slurm(root, sizes["latency"])),
        ]
        if args.only:
            sections = [(name, section) for name, section in sections if name in args.only.split(",")]
        created = [creation_time(root, "creation-start")]
        for name, section in sections:
            print(f"bench: {name}...", file=sys.stderr, flush=True)
            try:
                rows.extend(section())
            except Exception as exc:   # one broken section must not hide the others
                rows.append((name, f"failed: {exc}", "-", "-", "-", "-"))
        created.append(creation_time(root, "creation-end"))
        rows.append(("creating an empty file in the benchmark's directory (the disk's state, see `creation_time`)",
                     f"{created[0] * 1e6:.0f} us at the start, {created[1] * 1e6:.0f} us at the end", "-", "-", "-", "-"))
    header = ["measurement", "labrun", "reference", "ratio", "target", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    slower = [row[0] for row in rows if "slower" in str(row[5])]
    summary = ("labrun is slower than its target on: " + "; ".join(slower) + ". Profiles of why: "
               "[profiles.md](profiles.md).") if slower else "labrun meets every target measured here."
    machine = f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {'quick' if args.quick else 'full'} run"
    text = (f"# labrun benchmarks\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine}, "
            f"{time.time() - started:.0f} s, labrun installed from a wheel. Medians (p95 where shown); ratios are to "
            f"the reference measured in the same run, interleaved with labrun where the section says so (snapshots, "
            f"CLI submits, submit-to-start, throughput), so a busy machine slows both alike; absolute numbers vary with the machine's load "
            f"(load average at the end: {os.getloadavg()[0]:.1f}).\n\n" + "\n".join(lines) + f"\n\n{summary}\n")
    if not args.only:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
