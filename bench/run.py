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
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(self.socket))
                return self
            except OSError:
                time.sleep(0.02)
            finally:
                probe.close()
        raise RuntimeError("agent did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
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
    from labrun import Experiment, ScriptRunConfig

    rows = []
    source = root / "src"
    source.mkdir()
    (root / "lat").mkdir()
    agent = Agent(root / "lat").start()
    try:
        experiment = Experiment(agent.workspace(), "bench")
        experiment.workspace.connection   # connect once, like a long-lived client
        client, cli = [], []
        for i in range(n):
            stamp = root / f"c{i}"
            t0 = time.time()
            run = experiment.submit(ScriptRunConfig(str(source), command=stamp_command(stamp)))
            client.append(read_stamp(stamp) - t0)
            experiment.workspace.wait_for_run(run.id)
        for i in range(n):
            stamp = root / f"l{i}"
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "labrun.cli", "submit", "--source-dir", str(source), "--",
                            stamp_command(stamp)], env=agent.env, check=True, capture_output=True)
            cli.append(read_stamp(stamp) - t0)
    finally:
        agent.stop()

    tsp_times = tsp_latency(root, n)
    floor = []
    for i in range(n):
        stamp = root / f"f{i}"
        t0 = time.time()
        subprocess.Popen(["sh", "-c", stamp_command(stamp)]).wait()
        floor.append(read_stamp(stamp) - t0)

    reference = median_p95(tsp_times)[0] if tsp_times else None
    for name, values, target in (("submit-to-start, Python client", client, 1.0),
                                 ("submit-to-start, CLI (`labrun submit`)", cli, 10.0)):
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


def tsp_latency(root: Path, n: int) -> list[float]:
    if shutil.which("tsp") is None:
        return []
    env = tsp_env(root)
    times = []
    try:
        for i in range(n):
            stamp = root / f"t{i}"
            t0 = time.time()
            job = subprocess.run(["tsp", "sh", "-c", stamp_command(stamp)], env=env, check=True,
                                 capture_output=True, text=True).stdout.strip()
            times.append(read_stamp(stamp) - t0)
            subprocess.run(["tsp", "-w", job], env=env, capture_output=True)
    finally:
        subprocess.run(["tsp", "-K"], env=env, capture_output=True)
    return times


def verdict(ok: bool) -> str:
    return "meets target" if ok else "**slower than target**"


# -- 2. throughput -----------------------------------------------------------------------------

def throughput(root: Path, n: int) -> list[tuple]:
    from labrun import Experiment, ScriptRunConfig

    (root / "thr").mkdir()
    source = root / "src"
    agent = Agent(root / "thr", "[resources]\nmax_concurrent_runs = 2\n").start()
    try:
        experiment = Experiment(agent.workspace(), "bench")
        t0 = time.time()
        ids = [experiment.submit(ScriptRunConfig(str(source), command=["true"])).id for _ in range(n)]
        submitted = time.time() - t0
        for run_id in ids:
            experiment.workspace.wait_for_run(run_id)
        labrun_rate = n / (time.time() - t0)
    finally:
        agent.stop()

    tsp_rate = None
    if shutil.which("tsp"):
        env = tsp_env(root)
        try:
            subprocess.run(["tsp", "-S", "2"], env=env, check=True, capture_output=True)
            t0 = time.time()
            jobs = [subprocess.run(["tsp", "true"], env=env, check=True, capture_output=True,
                                   text=True).stdout.strip() for _ in range(n)]
            for job in jobs:
                subprocess.run(["tsp", "-w", job], env=env, capture_output=True)
            tsp_rate = n / (time.time() - t0)
        finally:
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
    rows = [(f"throughput, {n} trivial runs, 2 at a time", f"{labrun_rate:.0f} runs/s "
             f"(submitting took {submitted:.1f} s)", f"tsp {tsp_rate:.0f} runs/s" if tsp_rate else "tsp not available",
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
            run = experiment.submit(ScriptRunConfig(str(root / "src"), command=command))
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
        experiment.submit(ScriptRunConfig(str(root / "src"), command=["sleep", "600"]))
        for _ in range(queued):
            experiment.submit(ScriptRunConfig(str(root / "src"), command=["true"]))
        rows.append((f"agent resident memory, {queued} runs queued", f"{rss_mib(agent.process.pid):.1f} MiB",
                     "-", "-", "-", "-"))
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "labrun.cli", "ls"], env=agent.env, check=True, capture_output=True)
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
            subprocess.run([sys.executable, "-m", "labrun.cli", *args], env=agent.env, check=True,
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
            run = experiment.submit(ScriptRunConfig(str(root / "src"), command=["touch", "outputs/t"],
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
    sizes = dict(latency=15, throughput=200, log_mib=256, queued=1000, finished=20000, docker=5) if args.quick else \
        dict(latency=60, throughput=1000, log_mib=1024, queued=10000, finished=100000, docker=20)
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="labrun-bench-") as tmp:
        root = Path(tmp)
        sections = [
            ("latency", lambda: latency(root, sizes["latency"])),
            ("throughput", lambda: throughput(root, sizes["throughput"])),
            ("log capture", lambda: log_capture(root, sizes["log_mib"])),
            ("footprint", lambda: footprint(root, sizes["queued"], sizes["finished"])),
            ("docker", lambda: docker_latency(root, sizes["docker"])),
            ("slurm", lambda: slurm(root, sizes["latency"])),
        ]
        if args.only:
            sections = [(name, section) for name, section in sections if name in args.only.split(",")]
        for name, section in sections:
            print(f"bench: {name}...", file=sys.stderr, flush=True)
            try:
                rows.extend(section())
            except Exception as exc:   # one broken section must not hide the others
                rows.append((name, f"failed: {exc}", "-", "-", "-", "-"))
    header = ["measurement", "labrun", "reference", "ratio", "target", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    slower = [row[0] for row in rows if "slower" in str(row[5])]
    summary = ("labrun is slower than its target on: " + "; ".join(slower) + ".") if slower else \
        "labrun meets every target measured here."
    machine = f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {'quick' if args.quick else 'full'} run"
    text = (f"# labrun benchmarks\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine}, "
            f"{time.time() - started:.0f} s. Medians (p95 where shown); ratios are to the reference measured in the "
            f"same run.\n\n" + "\n".join(lines) + f"\n\n{summary}\n")
    if not args.only:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
