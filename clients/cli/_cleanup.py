"""``labrun rm`` and ``labrun clean``: deleting finished runs' directories (and, with ``--purge``, the runs)."""

from __future__ import annotations

import sys

from labrun.protocol import AgentError

from . import EXIT_LABRUN, _expand, _format, _print_json, _workspace


def _report_removed(args, result: dict) -> int:
    """Print what ``rm``/``clean`` removed; 125 if any run could not be."""
    if args.json:
        _print_json(result)
    failed = [r for r in result["removed"] if r.get("error")]
    if not args.json:
        for removed in result["removed"]:
            if removed.get("error"):
                print(f"labrun: {removed['run_id']}: {removed['error']}", file=sys.stderr)
            else:
                print(f"removed {removed['run_id']} ({_format.format_memory(removed['freed_bytes'])})")
        count = len(result["removed"]) - len(failed)
        print(f"freed {_format.format_memory(result['freed_bytes'])} in {count} run{'' if count == 1 else 's'}",
              file=sys.stderr)
    return EXIT_LABRUN if failed else 0


def cmd_rm(args) -> int:
    workspace = _workspace(args)
    removed = []
    for run_id in _expand(workspace, args.runs):
        try:
            removed.append(workspace._call("remove", run_id=run_id, purge=args.purge))
        except AgentError as exc:
            removed.append({"run_id": run_id, "freed_bytes": 0, "error": exc.message})
    return _report_removed(args, {"removed": removed, "freed_bytes": sum(r["freed_bytes"] for r in removed)})


def cmd_clean(args) -> int:
    result = _workspace(args)._call("clean", older_than=args.older_than, status=args.status or None,
                                    all_users=args.all_users, purge=args.purge)
    return _report_removed(args, result)
