"""What mirroring into MLflow costs a run: submit-to-start latency and log capture, mirroring off and on.

    python bench/mlflow.py [--quick]

Three agents run side by side, and each measurement goes round them, each first in turn, so that they
share the machine's ups and downs: mirroring off; on, with ``MLFLOW_*`` in runs (the default: a run takes
an MLflow run made ready ahead, or waits for its own); on, with ``run_env = false``. The two that mirror each run their
embedded MLflow server (a real ``mlflow server``, SQLite, on 127.0.0.1), as ``labrun ui`` sets up.
Writes bench/results/mlflow.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import Agent, median_p95, ms, read_stamp, stamp_command  # noqa: E402  (bench/run.py's helpers)

RESULTS = Path(__file__).resolve().parent / "results" / "mlflow.md"


def within(value: float, reference: float, higher_is_better: bool) -> str:
    ratio = value / reference
    ok = ratio >= 0.95 if higher_is_better else ratio <= 1.05
    return f"{ratio:.2f}x", "within 5%" if ok else "**outside 5%**"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, log_mib, rounds = (15, 256, 2) if args.quick else (60, 1024, 6)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="labrun-bench-mlflow-") as tmp:
        root = Path(tmp)
        source = root / "src"
        source.mkdir()
        agents = {}
        try:
            for name, config in (("off", ""),
                                 ("on", "[mlflow]\nembedded = true\n"),
                                 ("on, run_env = false", "[mlflow]\nembedded = true\nrun_env = false\n")):
                (root / name).mkdir()
                agents[name] = Agent(root / name, config).start()
                if config:   # until its MLflow server answers
                    subprocess.run([sys.executable, "-m", "labrun.cli", "ui"], env=agents[name].env, check=True,
                                   capture_output=True)
            from labrun import Experiment, ScriptRunConfig

            experiments = {name: Experiment(agent.workspace(), "bench") for name, agent in agents.items()}
            names = list(agents)
            latency = {(name, settled): [] for settled in (True, False) for name in agents}
            for settled in (True, False):
                print(f"bench: latency ({'mirror caught up' if settled else 'back to back'})...", file=sys.stderr,
                      flush=True)
                for i in range(n):
                    if settled:   # each run is submitted once the mirrors have caught up with the earlier ones
                        for name in names[1:]:
                            while (mirror := experiments[name].workspace.status()["mlflow"]["mirror"])["backlog"] \
                                    or mirror["pool_filling"]:
                                time.sleep(0.01)
                    for name in names[i % 3:] + names[:i % 3]:   # each agent goes first in turn
                        experiment = experiments[name]
                        stamp = root / f"stamp-{settled}-{i}-{len(name)}"
                        t0 = time.time()
                        run = experiment.submit(ScriptRunConfig(str(source), command=stamp_command(stamp)))
                        latency[name, settled].append(read_stamp(stamp) - t0)
                        experiment.workspace.wait_for_run(run.id)
            claimed = experiments["on"].workspace.status()["mlflow"]["mirror"]["pool_claimed"]
            print("bench: log capture...", file=sys.stderr, flush=True)
            capture = {name: [] for name in ("off", "on")}
            for round_ in range(rounds):
                for name in (("off", "on") if round_ % 2 else ("on", "off")):
                    subprocess.run(["sync"], check=True)
                    t0 = time.time()
                    run = experiments[name].submit(ScriptRunConfig(str(source), command=f"head -c {log_mib}M /dev/zero"))
                    experiments[name].workspace.wait_for_run(run.id)
                    capture[name].append(time.time() - t0)
                    log = agents[name].state / "runs" / run.id / "logs" / "std_log.txt"
                    assert log.stat().st_size == log_mib << 20
                    log.unlink()
        finally:
            for agent in agents.values():
                agent.stop()

    rows = []
    for (name, settled), values in latency.items():
        off = median_p95(latency["off", settled])[0]
        med, p95 = median_p95(values)
        ratio, verdict = within(med, off, False) if name != "off" else ("-", "-")
        when = "mirror caught up" if settled else "runs back to back, the mirror always busy"
        rows.append((f"submit-to-start ({when}), mirroring {name}", f"{ms(med)} (p95 {ms(p95)})", ratio, verdict))
    rates = {name: log_mib / statistics.median(values) for name, values in capture.items()}
    for name, rate in rates.items():
        ratio, verdict = within(rate, rates["off"], True) if name != "off" else ("-", "-")
        rows.append((f"log capture, {log_mib} MiB, mirroring {name}", f"{rate:.0f} MiB/s", ratio, verdict))
    lines = ["| measurement | median | ratio to mirroring off | verdict |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    machine = f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {'quick' if args.quick else 'full'} run"
    text = (f"# labrun benchmarks: mirroring into MLflow\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{machine}, {n} runs per agent, {time.time() - started:.0f} s. The agents took turns; those that mirror "
            f"each had their embedded `mlflow server`. Ratios compare agents that took turns within this run; on a "
            f"busy machine they move by tens of percent from one run of the script to the next, so run it again "
            f"before reading much into one.\n\n" + "\n".join(lines) + "\n\n"
            f"With mirroring on and `MLFLOW_*` in runs, {claimed} of the {2 * n} runs of the latency measurements took "
            f"an MLflow run made ready ahead; the others waited for their own (the first of the experiment, a pool "
            f"used up).\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
