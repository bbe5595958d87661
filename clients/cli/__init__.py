"""``labrun``: the command line. Each subcommand is a short function: build the request, call the agent,
print, and exit non-zero on failure. ``main`` maps agent errors to one clear line on stderr.

Exit codes: a run's own exit code for ``run`` and ``wait``; 124 when a run hit its
max duration, 130 when canceled, 128+N when killed by signal N; 1 for an error
from the agent, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from labrun.protocol import TERMINAL, AgentError, parse_duration, parse_memory

from ..exceptions import AzureMLException
from . import _format

DEFAULT_EXPERIMENT = "default"


class UsageError(Exception):
    pass


# -- helpers -----------------------------------------------------------------------------

def _workspace(args):
    from .._workspace import Workspace

    return Workspace(socket=args.socket)


def _pairs(values: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for value in values or []:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} must be KEY=VALUE, got {value!r}")
        pairs[key] = rest
    return pairs


def exit_code_of(run: dict) -> int:
    if run["status"] == "Completed":
        return 0
    if run["status"] == "Canceled":
        return 124 if run["reason"] == "max_run_duration_exceeded" else 130
    if run["signal"] is not None:
        return 128 + run["signal"]
    if run["exit_code"] is not None:
        return run["exit_code"] or 1
    return 127 if run["reason"] == "start_failed" else 1


def _print_json(value) -> None:
    # One-shot dumps, compact for lists: only that uses json's C encoder (100,000 runs: seconds, not half a minute).
    if isinstance(value, list):
        sys.stdout.write(json.dumps(value, sort_keys=True, default=str, separators=(",", ":")) + "\n")
    else:
        sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


# -- submit and run ----------------------------------------------------------------------

def _submit(args) -> tuple[object, dict]:
    from .._snapshot import submit_spec
    from .._script_run_config import ScriptRunConfig

    command = list(args.command)
    if args.script:
        config = ScriptRunConfig(args.source_dir, script=args.script, arguments=command)
    elif not command:
        raise UsageError("nothing to run: give a command after '--', or --script FILE")
    else:
        # One argument with spaces is a shell command line; several are an argv, exec'd as is.
        shell_line = len(command) == 1 and any(c in command[0] for c in " \t;&|<>$`*?")
        config = ScriptRunConfig(args.source_dir, command=command[0] if shell_line else command)
    rc = config.run_config
    rc.environment_variables = _pairs(args.env, "--env")
    if args.max_duration is not None:
        rc.max_run_duration_seconds = args.max_duration
    rc.resources = {"cpus": args.cpus, "memory": args.memory, "gpus": args.gpus}
    rc.priority = args.priority
    if args.target:
        rc.target = args.target
    if args.image:
        from .._environment import Environment
        from .._runconfig import DockerConfiguration

        rc.environment = Environment.from_docker_image(f"image-{args.image}", args.image)
        rc.environment.environment_variables = {}
        rc.docker = DockerConfiguration(use_docker=True, shm_size=args.shm_size or "2g")
    elif args.shm_size:
        raise UsageError("--shm-size goes with --image")
    spec = config._to_spec(args.experiment)
    spec["display_name"] = args.name
    spec["tags"] = _pairs(args.tag, "--tag")
    workspace = _workspace(args)
    return workspace, submit_spec(workspace, spec, args.source_dir, in_place=args.in_place)


def cmd_submit(args) -> int:
    _, run = _submit(args)
    if args.json:
        _print_json(run)
    else:
        print(run["run_id"])
    return 0


def _follow(workspace, run_id: str, out) -> None:
    for item in workspace._stream("logs", run_id=run_id, follow=True):
        out.write(item["data"])
        out.flush()


def cmd_run(args) -> int:
    workspace, run = _submit(args)
    run_id = run["run_id"]
    print(f"labrun: submitted {run_id}", file=sys.stderr)
    out = sys.stdout.buffer
    try:
        _follow(workspace, run_id, out)
    except KeyboardInterrupt:
        # Ctrl-C cancels the run; a second Ctrl-C stops waiting for it to end.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        print(f"\nlabrun: canceling {run_id}", file=sys.stderr)
        workspace._call("cancel", run_id=run_id)
        _follow(workspace, run_id, out)
    run = workspace.wait_for_run(run_id)
    if args.json:
        _print_json(run)
    if run["status"] != "Completed":
        print(f"labrun: run {run_id} {run['status']}: {run['error'] or run['reason'] or ''}".rstrip(": "),
              file=sys.stderr)
    return exit_code_of(run)


# -- inspecting --------------------------------------------------------------------------

def cmd_ls(args) -> int:
    runs = list(_workspace(args).list_runs(all=args.all, experiment=args.experiment))
    if args.json:
        _print_json(runs)
        return 0
    rows = [[r["run_id"], r["status"], r["user"], r["experiment"], _format.age(r["submitted_at"]),
             _format.run_duration(r), _format.outcome(r)] for r in runs]
    print(_format.table(["RUN", "STATUS", "USER", "EXPERIMENT", "SUBMITTED", "TIME", "INFO"], rows))
    return 0


def cmd_show(args) -> int:
    run = _workspace(args)._call("get", run_id=args.run)
    if args.json:
        _print_json(run)
    else:
        print(_format.show(run))
    return 0


def cmd_logs(args) -> int:
    workspace = _workspace(args)
    out = sys.stdout.buffer
    try:
        for item in workspace._stream("logs", run_id=args.run, follow=args.follow):
            out.write(item["data"])
            out.flush()
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_cancel(args) -> int:
    workspace = _workspace(args)
    failed = 0
    for run_id in args.runs:
        try:
            run = workspace._call("cancel", run_id=run_id)
            print(f"{run_id}: {run['status']}")
        except AgentError as exc:
            print(f"labrun: {run_id}: {exc.message}", file=sys.stderr)
            failed = 1
    return failed


def cmd_wait(args) -> int:
    workspace = _workspace(args)
    code = 0
    for run_id in args.runs:
        run = workspace.wait_for_run(run_id, timeout=args.timeout)
        if run["status"] not in TERMINAL:
            print(f"labrun: {run_id} is still {run['status']} after {args.timeout} s", file=sys.stderr)
            return 124
        if args.json:
            _print_json(run)
        else:
            print(f"{run_id}: {run['status']}" + (f" ({run['error']})" if run["error"] else ""))
        code = code or exit_code_of(run)
    return code


def _run_handle(args):
    from .._experiment import Experiment
    from .._run import ScriptRun

    workspace = _workspace(args)
    details = workspace._call("get", run_id=args.run)
    return ScriptRun(Experiment(workspace, details["experiment"], _skip_name_validation=True), args.run,
                     _details=details)


def cmd_metrics(args) -> int:
    metrics = _run_handle(args).get_metrics()
    if args.json:
        _print_json(metrics)
        return 0
    rows = []
    for name, value in sorted(metrics.items()):
        if isinstance(value, list):
            shown = f"{len(value)} values, last {value[-1]!r}"
        else:
            shown = json.dumps(value, default=str)
        rows.append([name, shown])
    print(_format.table(["METRIC", "VALUE"], rows) if rows else "no metrics")
    return 0


def cmd_download(args) -> int:
    run = _run_handle(args)
    for path in run.download_files(prefix=args.prefix, output_directory=args.output):
        print(path)
    return 0


def cmd_events(args) -> int:
    workspace = _workspace(args)
    types = args.type or None
    try:
        for event in workspace.watch(args.since, run_id=args.run, experiment=args.experiment, types=types,
                                     follow=args.follow):
            if args.json:
                sys.stdout.write(json.dumps(event, sort_keys=True, default=str) + "\n")
            else:
                data = event["data"]
                detail = " ".join(f"{k}={v}" for k, v in sorted(data.items()) if k != "previous")
                print(f"{event['seq']:>6}  {_format.age(event['time'])}  {event['type']:<22} "
                      f"{event['run_id'] or '-'}  {event['user'] or '-'}  {detail}".rstrip())
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_status(args) -> int:
    status = _workspace(args).status()
    if args.json:
        _print_json(status)
        return 0
    cap, used = status["capacity"], status["in_use"]
    print(f"agent     labrund {status['agent_version']} (pid {status['pid']}), up "
          f"{_format.duration(status['uptime_seconds'])}, socket {status['socket']}")
    print(f"cpus      {used['cpus']}/{cap['cpus']} in use")
    print(f"memory    {_format.format_memory(used['memory'])}/{_format.format_memory(cap['memory'])} reserved")
    print(f"gpus      {len(used['gpus'])}/{len(cap['gpus'])} in use"
          + (f" ({','.join(used['gpus'])} of {','.join(cap['gpus'])})" if cap["gpus"] else ""))
    counts = ", ".join(f"{k} {v}" for k, v in sorted(status["runs"].items())) or "none"
    print(f"runs      {counts}")
    if status.get("draining"):
        print("state     drained: no run is active; 'labrun agent resume' starts queued runs again"
              if status.get("drained") else f"state     draining: {status['active']} active run(s) left, none starts")
    containment = (status.get("containment") or {}).get("local")
    if containment:
        print(f"contain   {containment}")
    hub = status.get("hub")
    if hub:
        print(f"hub       {hub['url']}: {hub['state']}, delivered up to event {hub['delivered_seq']}, "
              f"backlog {hub['backlog']}" + (f", last error: {hub['last_error']}" if hub["last_error"] else ""))
    for user, use in sorted(status["by_user"].items()):
        gpus = ",".join(use["gpus"]) or "-"
        print(f"  {user}: {use['runs']} running, cpus {use['cpus']}, "
              f"memory {_format.format_memory(use['memory'] or None)}, gpus {gpus}")
    return 0


def cmd_agent_drain(args) -> int:
    """``labrun agent drain [--no-wait] [--timeout D]``: stop starting runs, and wait for the active ones."""
    parser = argparse.ArgumentParser(prog="labrun agent drain",
                                     description="Start no more runs (queued runs stay queued); wait until none is "
                                                 "active. Undo with: labrun agent resume")
    parser.add_argument("--no-wait", action="store_true", help="return at once")
    parser.add_argument("--timeout", type=_duration, help="wait at most this long")
    options = parser.parse_args(args.agent_args[1:])
    result = _workspace(args).drain(wait=not options.no_wait, timeout=options.timeout)
    if result["active"]:
        print(f"agent draining: {result['active']} active run(s) left; queued runs wait")
        return 0 if options.no_wait else 1
    print("agent drained: no run is active; queued runs wait until 'labrun agent resume'")
    return 0


def cmd_agent_resume(args) -> int:
    _workspace(args).resume()
    print("agent resumed: queued runs start again")
    return 0


def cmd_agent(args) -> int:
    if args.agent_args and args.agent_args[0] == "drain":
        return cmd_agent_drain(args)
    if args.agent_args and args.agent_args[0] == "resume":
        return cmd_agent_resume(args)
    try:
        from labrun.agent._main import main as agent_main
    except ImportError as exc:
        raise UsageError(f"the agent is not installed here ({exc}); install it with: pip install 'labrun[agent]'")

    return agent_main(args.agent_args)


# -- parser ------------------------------------------------------------------------------

def _duration(value: str) -> int:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _memory(value: str) -> int:
    try:
        return parse_memory(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labrun", description="Submit and watch runs on this machine's labrun agent.")
    parser.add_argument("--socket", help="the agent's socket (default: $LABRUN_SOCKET, the system agent, "
                                         "then a per-user agent started on demand)")
    commands = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    commands.required = True

    def submitting(name, func, help):
        p = commands.add_parser(name, help=help)
        p.add_argument("-e", "--experiment", default=DEFAULT_EXPERIMENT, help="experiment name (default: default)")
        p.add_argument("--name", help="display name")
        p.add_argument("--source-dir", default=".", help="directory to snapshot as the run's working directory")
        p.add_argument("--in-place", action="store_true",
                       help="run in --source-dir itself instead of a snapshot of it (no copy, no size limits; "
                            "later edits are seen by the run)")
        p.add_argument("--script", help="run this Python script (in --source-dir); what follows -- are its arguments")
        p.add_argument("--env", action="append", metavar="K=V", help="environment variable for the run (repeatable)")
        p.add_argument("--max-duration", type=_duration, metavar="DURATION",
                       help="time limit: seconds or like 1h30m (default 30 days)")
        p.add_argument("--tag", action="append", metavar="K=V", help="tag (repeatable)")
        p.add_argument("--cpus", type=int, default=1, help="CPU cores to reserve (default 1)")
        p.add_argument("--memory", type=_memory, help="memory to reserve, like 4G")
        p.add_argument("--gpus", type=int, default=0, help="GPUs to reserve (default 0)")
        p.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
        p.add_argument("--target", help="compute target: local (default) or a name from the agent's config, "
                                        "such as a Slurm cluster")
        p.add_argument("--image", help="run in a container of this Docker image")
        p.add_argument("--shm-size", help="with --image: size of /dev/shm, like 2g (default 2g)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
        p.set_defaults(func=func)

    submitting("run", cmd_run, "submit a run, stream its log, exit with its exit code (Ctrl-C cancels it)")
    submitting("submit", cmd_submit, "submit a run and print its id")

    p = commands.add_parser("ls", help="list runs (queued, running and recent; --all for every run)")
    p.add_argument("--all", action="store_true")
    p.add_argument("-e", "--experiment")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = commands.add_parser("show", help="show one run")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = commands.add_parser("logs", help="print a run's log")
    p.add_argument("run")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
    p.set_defaults(func=cmd_logs)

    p = commands.add_parser("cancel", help="cancel runs")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.set_defaults(func=cmd_cancel)

    p = commands.add_parser("wait", help="wait for runs to end; exit with the first failure's code")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--timeout", type=_duration)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_wait)

    p = commands.add_parser("metrics", help="a run's metrics (Azure ML's get_metrics shape with --json)")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_metrics)

    p = commands.add_parser("download", help="download a run's files (outputs, logs, uploads)")
    p.add_argument("run")
    p.add_argument("--prefix", help="only files whose name starts with this, e.g. outputs/")
    p.add_argument("-o", "--output", default=".", help="directory to write into (default .)")
    p.set_defaults(func=cmd_download)

    p = commands.add_parser("events", help="lifecycle events: the history, then (with --follow) new ones as they happen")
    p.add_argument("--since", type=int, default=0, help="only events after this seq (default 0: all kept)")
    p.add_argument("--run", help="only this run's events")
    p.add_argument("-e", "--experiment")
    p.add_argument("--type", action="append", help="only events of this type, e.g. run.completed (repeatable)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)

    p = commands.add_parser("status", help="the agent's capacity, what is in use, and by whom")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = commands.add_parser("agent", help="run the agent in the foreground (same options as labrund); "
                                          "'agent drain [--no-wait]' and 'agent resume' for maintenance")
    p.add_argument("agent_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_agent)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    if getattr(args, "agent_args", None) and args.agent_args[0] == "--":
        args.agent_args = args.agent_args[1:]
    try:
        return args.func(args)
    except UsageError as exc:
        parser.exit(2, f"labrun: {exc}\n")
    except (AgentError, AzureMLException) as exc:
        message = exc.message if isinstance(exc, AgentError) else str(exc)
        print(f"labrun: {message}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
