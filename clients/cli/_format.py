"""Human-readable output for the CLI: tables, times, sizes.

Names, tags, descriptions and errors come from other users: every string shown to a human goes
through ``escape``, so no control character (a terminal escape sequence, a carriage return that
hides what came before) reaches the terminal raw. ``--json`` output is JSON-escaped already.
"""

from __future__ import annotations

import time

from labrun.protocol import format_memory


# C0 and C1 controls, DEL, and the Unicode marks that reorder or hide text on a terminal.
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}
_ESCAPES = {code: _NAMED.get(chr(code), f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
            for code in [*range(0x20), *range(0x7f, 0xa0), *range(0x200b, 0x2010), *range(0x202a, 0x202f),
                         *range(0x2066, 0x206a)]}


def escape(value) -> str:
    """``value`` as text that is safe to print: each control character as a visible escape (``\\e``, ``\\x07``)."""
    return str(value).translate(_ESCAPES)


def age(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def interval(seconds: float) -> str:
    """A period as the configuration writes it: ``1h``, ``10m``, ``1h30m``, ``45s``."""
    seconds, parts = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts)


def run_duration(run: dict) -> str:
    if run["started_at"] is None:
        return "-"
    return duration((run["ended_at"] or time.time()) - run["started_at"])


def outcome(run: dict) -> str:
    """What ``ls`` shows for a run beyond its status: why it waits, or how it ended."""
    waiting = run.get("waiting")
    if waiting and waiting.get("on"):
        return f"waiting: {waiting['reason']} ({','.join(waiting['on'])})"
    if waiting:
        return f"waiting: {waiting['reason']}" + _position(waiting)
    if run.get("files_removed_at"):
        return "files removed"
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


def tree(runs: list[dict]) -> list[tuple[str, dict]]:
    """Runs with their children under them (oldest first), as ``(prefix, run)``; the rest keep their order."""
    listed = {r["run_id"] for r in runs}
    children: dict[str, list[dict]] = {}
    for run in runs:
        parent = run.get("parent_run_id")
        if parent in listed:
            children.setdefault(parent, []).append(run)
    rows: list[tuple[str, dict]] = []

    def add(run: dict, prefix: str, branch: str) -> None:
        rows.append((prefix + branch, run))
        below = sorted(children.get(run["run_id"], []), key=lambda r: r["order"])
        inner = prefix + ("   " if branch.startswith("└") else "│  " if branch else "")
        for i, child in enumerate(below):
            add(child, inner, "└─ " if i == len(below) - 1 else "├─ ")

    for run in runs:
        if run.get("parent_run_id") not in listed:
            add(run, "", "")
    return rows


def table(headers: list[str], rows: list[list[str]]) -> str:
    rows = [[escape(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(c) for c in column) for column in zip(*rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def command_line(run: dict) -> str:
    if run["script"] is not None:
        return " ".join(["python", run["script"], *run["arguments"]])
    command = run["command"]
    if command is None:
        return "(interactive: start_logging or child_run)"
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
    if run.get("array"):
        array = run["array"]
        rows.append(("Array", f"{array['id']} index {array['index']} of {array['size']}"
                              + (f", at most {array['throttle']} at once" if array["throttle"] else "")))
    for key in ("after", "afterok"):
        if run.get(key):
            rows.append(("After" if key == "after" else "After ok", ", ".join(run[key])))
    if run.get("files_removed_at"):
        rows.append(("Files", f"removed {age(run['files_removed_at'])}"))
    for key, value in sorted(run["tags"].items()):
        rows.append(("Tag", f"{key}={value}"))
    if run.get("mlflow"):
        rows.append(("MLflow", run["mlflow"]["url"]))
    # What did not fail the run but its owner should know (Azure ML's get_details()["warnings"]).
    for warning in run.get("warnings") or []:
        rows.append(("Warning", warning["message"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k + ':':<{width + 1}} {escape(v) if v is not None else '-'}" for k, v in rows)


def name(run: dict) -> str:
    """The display name, when one was given (else it is the run id, already in the first column)."""
    shown = run.get("display_name")
    return shown if shown and shown != run["run_id"] else "-"


def tags(run: dict) -> str:
    return ",".join(f"{k}={v}" if v else k for k, v in sorted(run["tags"].items())) or "-"


def index_ranges(indices: list[int]) -> str:
    """[1, 2, 3, 5, 7, 8] -> "1-3,5,7-8", as squeue shows array tasks."""
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts)


def group_arrays(runs: list[dict]) -> list[dict]:
    """One summary line per array (``ID_[0-9%2]``, status counts), where the array's first run was listed."""
    members: dict[str, list[dict]] = {}
    for run in runs:
        if run.get("array"):
            members.setdefault(run["array"]["id"], []).append(run)
    shown, done = [], set()
    for run in runs:
        array = run.get("array")
        if not array:
            shown.append(run)
            continue
        if array["id"] in done:
            continue
        done.add(array["id"])
        group = sorted(members[array["id"]], key=lambda r: r["array"]["index"])
        throttle = f"%{array['throttle']}" if array["throttle"] else ""
        counts: dict[str, int] = {}
        for member in group:
            counts[member["status"]] = counts.get(member["status"], 0) + 1
        first = group[0]
        shown.append({**first, "run_id": f"{array['id']}_[{index_ranges([r['array']['index'] for r in group])}{throttle}]",
                      "display_name": None if name(first) == "-" else first["display_name"],
                      "status": ",".join(f"{n} {status}" for status, n in sorted(counts.items())),
                      "started_at": min((r["started_at"] for r in group if r["started_at"]), default=None),
                      "ended_at": None if any(r["ended_at"] is None for r in group)
                      else max(r["ended_at"] for r in group),
                      "waiting": None, "files_removed_at": None, "reason": None, "exit_code": None, "signal": None,
                      "allocation": None})
    return shown


def _position(waiting: dict, word: str = "#") -> str:
    """A run's place in this agent's queue; a run waiting in a cluster's queue (Slurm) has none here."""
    return f" ({word}{waiting['position']})" if waiting.get("position") is not None else ""
