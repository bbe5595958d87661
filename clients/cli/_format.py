"""Human-readable output for the CLI: tables, times, sizes."""

from __future__ import annotations

import datetime
import time

from labrun.protocol import format_memory


def age(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def run_duration(run: dict) -> str:
    if run["started_at"] is None:
        return "-"
    return duration((run["ended_at"] or time.time()) - run["started_at"])


def outcome(run: dict) -> str:
    """What ``ls`` shows for a run beyond its status: why it waits, or how it ended."""
    if run.get("waiting"):
        return f"waiting: {run['waiting']['reason']}" + _position(run["waiting"])
    if run["status"] in ("Completed", "Failed", "Canceled"):
        if run["status"] == "Canceled":
            return run["reason"] or "canceled"
        if run["signal"] is not None:
            return f"signal {run['signal']}"
        if run["reason"] and run["reason"] not in ("exit_code",):
            return run["reason"]
        if run["exit_code"] is not None:
            return f"exit {run['exit_code']}"
    if run.get("allocation") and run["allocation"].get("gpus"):
        return f"gpus {','.join(run['allocation']['gpus'])}"
    return ""


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def command_line(run: dict) -> str:
    if run["script"] is not None:
        return " ".join(["python", run["script"], *run["arguments"]])
    command = run["command"]
    return command if isinstance(command, str) else " ".join(command)


def show(run: dict) -> str:
    rows = [
        ("Run", run["run_id"]),
        ("Number", run["number"]),
        ("Experiment", run["experiment"]),
        ("Name", run["display_name"]),
        ("Status", run["status"]),
        ("User", f"{run['user']} (uid {run['uid']})"),
        ("Command", command_line(run)),
        ("Target", run["target"]),
        ("Submitted", age(run["submitted_at"])),
        ("Started", age(run["started_at"])),
        ("Ended", age(run["ended_at"])),
        ("Duration", run_duration(run)),
        ("Max duration", duration(run["max_run_duration_seconds"])),
        ("Priority", run["priority"]),
    ]
    resources = run.get("resources") or {}
    rows.append(("Requested", f"cpus={resources.get('cpus')} memory={format_memory(resources.get('memory'))} "
                              f"gpus={resources.get('gpus')}"))
    allocation = run.get("allocation")
    if allocation:
        cores = ",".join(map(str, allocation.get("cores") or [])) or "-"
        gpus = ",".join(allocation.get("gpus") or []) or "-"
        rows.append(("Allocated", f"cpus={allocation['cpus']} cores={cores} gpus={gpus}"))
    if run.get("waiting"):
        rows.append(("Waiting", f"{run['waiting']['reason']}" + _position(run["waiting"], "position ")))
    if run["exit_code"] is not None:
        rows.append(("Exit code", run["exit_code"]))
    if run["signal"] is not None:
        rows.append(("Signal", run["signal"]))
    if run["reason"]:
        rows.append(("Reason", run["reason"]))
    if run["error"]:
        rows.append(("Error", run["error"]))
    for key, value in sorted(run["tags"].items()):
        rows.append(("Tag", f"{key}={value}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k + ':':<{width + 1}} {v if v is not None else '-'}" for k, v in rows)


def _position(waiting: dict, word: str = "#") -> str:
    """A run's place in this agent's queue; a run waiting in a cluster's queue (Slurm) has none here."""
    return f" ({word}{waiting['position']})" if waiting.get("position") is not None else ""
