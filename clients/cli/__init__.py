"""``labrun``: the command line. Each subcommand is a short function: build the request, call the agent,
print, and exit non-zero on failure. ``main`` maps agent errors to one clear line on stderr.

Exit codes, following docker: a run's own exit code passes through (``run``, ``wait``,
``logs --exit-status``); 124 when a run hit its max duration, 130 when canceled, 128+N
when killed by signal N. labrun's own failures use codes no ordinary program uses for
itself: 125 when labrun or the agent failed or refused, 126 when the command could
not be started, 127 when it was not found. 2 is argparse's bad usage, and only ever
comes before anything was submitted.

Output: ``--json`` prints one JSON document (an object, or an array for lists);
``--jsonl`` one object per line, for streams and many-run outputs.
"""

from __future__ import annotations

import os
import sys

from labrun.protocol import TERMINAL, AgentError

from ..exceptions import AzureMLException
from . import _args, _format
from ._args import REMAINDER

DEFAULT_EXPERIMENT = "default"
EXIT_LABRUN = 125        # labrun or the agent failed, or the agent refused
EXIT_CANNOT_START = 126  # the command exists but could not be started
EXIT_NOT_FOUND = 127     # the command was not found


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
    """What ``wait``, ``run`` and ``logs --exit-status`` exit with for a finished run (docker's conventions)."""
    if run["status"] == "Completed":
        return 0
    if run["status"] == "Canceled":
        return 124 if run["reason"] == "max_run_duration_exceeded" else 130
    if run["signal"] is not None:
        return 128 + run["signal"]
    if run["exit_code"] is not None:
        return run["exit_code"] or EXIT_LABRUN
    if run["reason"] == "command_not_found":
        return EXIT_NOT_FOUND
    if run["reason"] == "start_failed":
        return EXIT_CANNOT_START
    return EXIT_LABRUN   # the agent lost it, failed to prepare it, or has no image for it


def _print_json(value) -> None:
    """One JSON document on stdout. One-shot dumps, compact for lists: only that uses json's C encoder
    (100,000 runs: seconds, not half a minute)."""
    import json

    if isinstance(value, list):
        sys.stdout.write(json.dumps(value, sort_keys=True, default=str, separators=(",", ":")) + "\n")
    else:
        sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def _print_jsonl(value) -> None:
    """One JSON object on one line, flushed: a stream consumer sees it at once."""
    import json

    sys.stdout.write(json.dumps(value, sort_keys=True, default=str, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _split_ids(values: list[str] | None) -> list[str]:
    """``--after A,B --after C`` -> [A, B, C]."""
    return [part for value in values or [] for part in value.split(",") if part]


def _slurm_dependency(value: str | None) -> tuple[list[str], list[str]]:
    """Slurm's ``--dependency afterok:A:B,afterany:C`` -> (after, afterok) run ids."""
    after: list[str] = []
    afterok: list[str] = []
    for part in (value or "").split(","):
        if not part:
            continue
        kind, _, ids = part.partition(":")
        if kind not in ("afterany", "afterok") or not ids:
            raise UsageError(f"--dependency: labrun supports afterok:RUN[:RUN...] and afterany:RUN[:RUN...], "
                             f"got {part!r}")
        (after if kind == "afterany" else afterok).extend(i for i in ids.split(":") if i)
    return after, afterok


def _expand(workspace, ids: list[str]) -> list[str]:
    """Run ids, with each array id replaced by its members in index order."""
    runs = []
    for run_id in ids:
        members = sorted(workspace.list_runs(array=run_id), key=lambda m: m["array"]["index"])
        runs += [m["run_id"] for m in members] or [run_id]
    return runs


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
    rc.environment = None   # the CLI's runs use the caller's interpreter and variables, without Azure ML's defaults
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
    if not args.script and not shell_line:
        spec["command"] = command   # exec'd as an argv, as `docker run` does (the Python API joins it for a shell)
    spec["display_name"] = args.name
    spec["tags"] = {k: v or "" for k, v in _tag_options(args.tag).items()}   # --tag K: a tag without value
    after, afterok = _slurm_dependency(args.dependency)
    spec["after"] = _split_ids(args.after) + after
    spec["afterok"] = _split_ids(args.afterok) + afterok
    array = None
    if getattr(args, "array", None):
        indices, throttle = args.array
        array = {"indices": indices, "throttle": throttle}
    workspace = _workspace(args)
    return workspace, submit_spec(workspace, spec, args.source_dir, in_place=args.in_place, array=array)


def cmd_submit(args) -> int:
    _, run = _submit(args)
    if args.json:
        _print_json(run)
    else:
        print(run.get("array_id") or run["run_id"])
    return 0


def _follow(workspace, run_id: str, out) -> None:
    for item in workspace._stream("logs", run_id=run_id, follow=True):
        out.write(item["data"])
        out.flush()


def cmd_run(args) -> int:
    workspace, run = _submit(args)
    run_id = run["run_id"]
    print(f"labrun: submitted {run_id}", file=sys.stderr)
    # With --json, stdout carries the one JSON document: the log goes to stderr.
    out = sys.stderr.buffer if args.json else sys.stdout.buffer
    try:
        _follow(workspace, run_id, out)
    except KeyboardInterrupt:
        import signal

        # Ctrl-C cancels the run; a second Ctrl-C stops waiting for it to end.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        print(f"\nlabrun: canceling {run_id}", file=sys.stderr)
        workspace._call("cancel", run_id=run_id)
        _follow(workspace, run_id, out)
    run = workspace.wait_for_run(run_id)
    if args.json:
        _print_json(run)
    if run["status"] != "Completed":
        print(_ending(run), file=sys.stderr)
    return exit_code_of(run)


# -- inspecting --------------------------------------------------------------------------

def cmd_ls(args) -> int:
    filters = {"all": args.all, "experiment": args.experiment}
    if args.array:
        filters = {"array": args.array}
    runs = list(_workspace(args).list_runs(**filters))
    wanted = _tag_options(args.tag)
    runs = [r for r in runs if all(k in r["tags"] and (v is None or r["tags"][k] == v) for k, v in wanted.items())]
    if args.json:
        _print_json(runs)
        return 0
    if args.jsonl:
        for run in runs:
            _print_jsonl(run)
        return 0
    # Child runs (Azure ML's run hierarchies) are shown under their parent.
    rows = [[prefix + r["run_id"], _format.name(r), r["status"], r["user"], r["experiment"], _format.age(r["submitted_at"]),
             _format.run_duration(r), _format.outcome(r), _format.tags(r)]
            for prefix, r in _format.tree(runs if args.array or args.expand else _format.group_arrays(runs))]
    print(_format.table(["RUN", "NAME", "STATUS", "USER", "EXPERIMENT", "SUBMITTED", "TIME", "INFO", "TAGS"], rows))
    return 0


def _tag_options(values: list[str] | None) -> dict[str, str | None]:
    """``--tag K=V`` (that value) and ``--tag K`` (any value) filters."""
    found = {}
    for value in values or []:
        key, sep, rest = value.partition("=")
        if not key:
            raise UsageError(f"--tag must be KEY or KEY=VALUE, got {value!r}")
        found[key] = rest if sep else None
    return found


def cmd_show(args) -> int:
    run = _workspace(args)._call("get", run_id=args.run)
    if args.json:
        _print_json(run)
    else:
        print(_format.show(run))
    return 0


def _ending(run: dict) -> str:
    """The one line that closes ``logs -f`` and ``run``: how the run ended."""
    detail = run["error"] or run["reason"] or ""
    return _format.escape(f"labrun: run {run['run_id']} {run['status']}" + (f": {detail}" if detail else ""))


def cmd_logs(args) -> int:
    workspace = _workspace(args)
    out = sys.stdout.buffer
    follow = args.follow or args.exit_status
    run_ids = _expand(workspace, [args.run])
    code = 0
    try:
        for run_id in run_ids:
            if len(run_ids) > 1:
                # An array's logs one after another, each under a header, as tail does for several files.
                out.write(f"==> {run_id} <==\n".encode())
            for item in workspace._stream("logs", run_id=run_id, follow=follow):
                out.write(item["data"])
                out.flush()
            if follow:
                run = workspace._call("get", run_id=run_id)
                print(_ending(run), file=sys.stderr)
                code = code or exit_code_of(run)
    except KeyboardInterrupt:
        return 130
    return code if args.exit_status else 0


def cmd_cancel(args) -> int:
    workspace = _workspace(args)
    failed, canceled = 0, []
    for run_id in args.runs:
        try:
            # An array id cancels the array's runs together (on Slurm: one scancel of the job array).
            reply = workspace._call("cancel", run_id=run_id)
        except AgentError as exc:
            print(f"labrun: {run_id}: {exc.message}", file=sys.stderr)
            failed = EXIT_LABRUN
            continue
        for run in reply["runs"] if "array_id" in reply else [reply]:
            canceled.append(run)
            if args.jsonl:
                _print_jsonl(run)
            elif not args.json:
                print(f"{run['run_id']}: {run['status']}")
    if args.json:
        _print_json(canceled)
    return failed


def cmd_wait(args) -> int:
    workspace = _workspace(args)
    code, ended = 0, []
    for run_id in _expand(workspace, args.runs):
        run = workspace.wait_for_run(run_id, timeout=args.timeout)
        if run["status"] not in TERMINAL:
            print(f"labrun: {run_id} is still {run['status']} after {args.timeout} s", file=sys.stderr)
            if args.json:
                _print_json(ended)
            return 124
        ended.append(run)
        if args.jsonl:
            _print_jsonl(run)
        elif not args.json:
            print(_format.escape(f"{run_id}: {run['status']}" + (f" ({run['error']})" if run["error"] else "")))
        code = code or exit_code_of(run)
    if args.json:
        _print_json(ended)
    return code


def _run_handle(workspace, details: dict):
    from .._experiment import Experiment
    from .._run import ScriptRun

    return ScriptRun(Experiment(workspace, details["experiment"], _skip_name_validation=True), details["run_id"],
                     _details=details)


def cmd_metrics(args) -> int:
    from . import _compare

    workspace = _workspace(args)
    runs = [workspace._call("get", run_id=run_id) for run_id in _expand(workspace, args.runs)]
    metrics = [_run_handle(workspace, run).get_metrics() for run in runs]
    if args.json:
        # One run: Azure ML's get_metrics shape; several: that shape per run id.
        _print_json(metrics[0] if len(args.runs) == 1 and len(runs) == 1
                    else {run["run_id"]: m for run, m in zip(runs, metrics)})
        return 0
    print(_compare.table(runs, metrics))
    return 0


def cmd_download(args) -> int:
    workspace = _workspace(args)
    run = _run_handle(workspace, workspace._call("get", run_id=args.run))
    for path in run.download_files(prefix=args.prefix, output_directory=args.output):
        print(path)
    return 0


def cmd_events(args) -> int:
    if args.json and args.follow:
        raise UsageError("--json prints one document once the history is read; a stream (--follow) takes --jsonl")
    workspace = _workspace(args)
    types = args.type or None
    events = []
    try:
        for event in workspace.watch(args.since, run_id=args.run, experiment=args.experiment, types=types,
                                     follow=args.follow):
            if args.json:
                events.append(event)
            elif args.jsonl:
                _print_jsonl(event)
            else:
                data = event["data"]
                detail = " ".join(f"{k}={v}" for k, v in sorted(data.items()) if k != "previous")
                print(_format.escape(f"{event['seq']:>6}  {_format.age(event['time'])}  {event['type']:<22} "
                                     f"{event['run_id'] or '-'}  {event['user'] or '-'}  {detail}".rstrip()))
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    if args.json:
        _print_json(events)
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
    disk = status.get("disk")
    if disk:
        kept = (f"run directories kept {disk['retention_days']:g} days (checked every "
                f"{_format.interval(disk.get('retention_interval_seconds', 3600))})" if disk["retention_days"]
                else "run directories kept until labrun rm/clean")
        print(f"disk      runs use {_format.format_memory(disk['runs_bytes'])}, snapshot store "
              f"{_format.format_memory(disk['snapshot_store_bytes'])}, "
              f"{_format.format_memory(disk['free_bytes'])} free of {_format.format_memory(disk['total_bytes'])}; "
              f"{kept}")
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
    mlflow = status.get("mlflow")
    if mlflow:
        mirror = mlflow.get("mirror") or {"state": "starting", "delivered_seq": 0, "backlog": 0, "last_error": None}
        print(f"mlflow    {mlflow['tracking_uri']}: {mirror['state']}, mirrored up to event {mirror['delivered_seq']}, "
              f"backlog {mirror['backlog']}" + (f", last error: {mirror['last_error']}" if mirror["last_error"] else ""))
        server = mlflow.get("server")
        if server:
            print(f"          embedded server: {server['state']}, pid {server['pid'] or '-'}, {server['restarts']} restarts"
                  + (f", last error: {server['last_error']}" if server["last_error"] else ""))
    _print_faults(status.get("faults") or [])
    for user, use in sorted(status["by_user"].items()):
        gpus = ",".join(use["gpus"]) or "-"
        print(f"  {_format.escape(user)}: {use['runs']} running, cpus {use['cpus']}, "
              f"memory {_format.format_memory(use['memory'] or None)}, gpus {gpus}")
    return 0


def cmd_agent_drain(args) -> int:
    """``labrun agent drain [--no-wait] [--timeout D]``: stop starting runs, and wait for the active ones."""
    import argparse

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


def cmd_completion(args) -> int:
    from . import _completion

    sys.stdout.write(_completion.script(args.shell))
    return 0


def cmd_complete(args) -> int:
    from . import _completion

    words = args.words
    if "--socket" in words[:-1]:   # labrun --socket PATH ...: complete from that agent
        args.socket = words[words.index("--socket") + 1]
    for word in _completion.candidates(build_parser(), words, lambda: _workspace(args)):
        print(word)
    return 0


def _print_faults(faults: list) -> None:
    """Problems the agent is living through (a full state disk); it retries and says when they clear."""
    for fault in faults:
        print(f"FAULT     {fault['where']}: {fault['error']} (since {_format.age(fault['since'])}, "
              f"{fault['count']} failed writes; the agent retries, runs go on, queued runs wait)")


def cmd_ui(args) -> int:
    """Print the MLflow UI's address; on a per-user agent with none yet, start the embedded one first."""
    result = _workspace(args)._call("ui", start=not args.no_start, timeout=args.timeout)
    if args.json:
        _print_json(result)
    elif result["url"] is None:
        print("labrun: this agent has no MLflow server; 'labrun ui' starts one on a per-user agent",
              file=sys.stderr)
        return EXIT_LABRUN
    else:
        print(result["url"])
        if not result["ready"]:
            print(f"labrun: the MLflow server at {result['url']} is still starting", file=sys.stderr)
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

def _parsed(parse, value: str):
    """``parse(value)``, its ValueError told as argparse's bad-value error."""
    try:
        return parse(value)
    except ValueError as exc:
        import argparse

        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(value: str) -> int:
    from labrun.protocol import parse_duration

    return _parsed(parse_duration, value)


def _array(value: str) -> tuple[list[int], int]:
    from labrun.protocol import parse_array

    return _parsed(parse_array, value)


def _memory(value: str) -> int:
    from labrun.protocol import parse_memory

    return _parsed(parse_memory, value)


class _Skipped:
    """Stands in for the parser of a subcommand that is not the one being run (see ``build_parser``)."""

    def add_argument(self, *args, **kwargs) -> None:
        pass

    def set_defaults(self, **kwargs) -> None:
        pass

    def add_mutually_exclusive_group(self, **kwargs) -> "_Skipped":
        return self


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with ``only``, with that subcommand alone (``parser.built`` says whether it is one).

    Building all thirteen subcommands' parsers takes longer than the rest of a submit's start-up, so
    ``main`` builds only the one it runs; ``--help``, errors and completion get them all.
    """
    import argparse

    from ._help import Formatter

    parser = argparse.ArgumentParser(prog="labrun", description="Submit and watch runs on this machine's labrun agent.",
                                     formatter_class=Formatter)
    _define(parser, only)
    return parser


def _define(parser, only: str | None) -> None:
    """Add the top level's arguments and the subcommands' (with ``only``, that one's alone) to ``parser``: an
    argparse parser, or the fast path's recorder (``_args``)."""
    from labrun.protocol import __version__

    from . import _cleanup

    parser.built = only is None
    parser.add_argument("--version", action="version", version=f"labrun {__version__}")
    parser.add_argument("--socket", help="the agent's socket (default: $LABRUN_SOCKET, the system agent, "
                                         "then a per-user agent started on demand)")
    commands = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    commands.required = True

    def add_parser(name, **kwargs):
        if only is None or name == only:
            parser.built = True
            return commands.add_parser(name, formatter_class=parser.formatter_class, **kwargs)
        return _Skipped()

    def submitting(name, func, help):
        p = add_parser(name, help=help)
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
        p.add_argument("--tag", action="append", metavar="K[=V]", help="tag (repeatable)")
        p.add_argument("--cpus", type=int, default=1, help="CPU cores to reserve (default 1)")
        p.add_argument("--memory", type=_memory, help="memory to reserve, like 4G")
        p.add_argument("--gpus", type=int, default=0, help="GPUs to reserve (default 0)")
        p.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
        p.add_argument("--target", help="compute target: local (default) or a name from the agent's config, "
                                        "such as a Slurm cluster")
        p.add_argument("--image", help="run in a container of this Docker image")
        p.add_argument("--shm-size", help="with --image: size of /dev/shm, like 2g (default 2g)")
        p.add_argument("--after", action="append", metavar="RUN[,RUN...]",
                       help="start once these runs (or arrays) have ended, whatever their outcome (repeatable)")
        p.add_argument("--afterok", action="append", metavar="RUN[,RUN...]",
                       help="start only if these runs (or arrays) all completed; else end Canceled (repeatable)")
        p.add_argument("-d", "--dependency", metavar="afterok:RUN[:RUN],afterany:RUN",
                       help="Slurm's spelling of --afterok and --after")
        p.add_argument("--json", action="store_true", help="print the run as one JSON object")
        p.add_argument("command", nargs=REMAINDER, help="-- CMD [ARGS...]")
        p.set_defaults(func=func)
        return p

    submitting("run", cmd_run, "submit a run, stream its log, exit with its exit code (Ctrl-C cancels it)")
    p = submitting("submit", cmd_submit, "submit a run and print its id")
    p.add_argument("--array", type=_array, metavar="INDICES[%N]",
                   help="one run per index, like Slurm: 1-20, 1,3,5, 0-15:4; %%N runs at most N at once")

    p = add_parser("ls", help="list runs (queued, running and recent; --all for every run)")
    p.add_argument("--all", action="store_true")
    p.add_argument("-e", "--experiment")
    p.add_argument("--tag", action="append", metavar="K[=V]", help="only runs with this tag (repeatable)")
    p.add_argument("--array", metavar="ARRAY", help="only this array's runs")
    p.add_argument("-x", "--expand", action="store_true", help="one line per array run instead of one per array")
    _json_options(p, "an array of runs", "one run per line")
    p.set_defaults(func=cmd_ls)

    p = add_parser("show", help="show one run")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = add_parser("logs", help="print a run's log (an array's: each run's in turn)")
    p.add_argument("run", metavar="RUN|ARRAY")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing until the run ends, then say how it ended on stderr")
    p.add_argument("--exit-status", action="store_true",
                   help="follow, then exit with the run's exit code (as labrun wait does)")
    p.set_defaults(func=cmd_logs)

    p = add_parser("cancel", help="cancel runs or arrays")
    p.add_argument("runs", nargs="+", metavar="RUN|ARRAY")
    _json_options(p, "an array of the runs", "one run per line")
    p.set_defaults(func=cmd_cancel)

    p = add_parser("wait", help="wait for runs or arrays to end; exit with the first failure's code")
    p.add_argument("runs", nargs="+", metavar="RUN|ARRAY")
    p.add_argument("--timeout", type=_duration)
    _json_options(p, "an array of the ended runs", "each run once it has ended, one per line")
    p.set_defaults(func=cmd_wait)

    p = add_parser("metrics", help="metrics of runs: one column per run, with the last and best values")
    p.add_argument("runs", nargs="+", metavar="RUN|ARRAY")
    p.add_argument("--json", action="store_true",
                   help="one run: Azure ML's get_metrics shape; several: that shape per run id")
    p.set_defaults(func=cmd_metrics)

    p = add_parser("rm", help="delete finished runs' directories (logs, outputs, snapshot)")
    p.add_argument("runs", nargs="+", metavar="RUN|ARRAY")
    p.add_argument("--purge", action="store_true", help="forget the runs too: details, metrics and tags")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cleanup.cmd_rm)

    p = add_parser("clean", help="delete the directories of your finished runs, like pueue clean")
    p.add_argument("--older-than", type=_duration, metavar="DURATION",
                   help="only runs that ended at least this long ago, like 7d or 12h")
    p.add_argument("--status", action="append", choices=["Completed", "Failed", "Canceled"],
                   help="only runs that ended so (repeatable; default: all three)")
    p.add_argument("--all-users", action="store_true", help="everyone's runs (admins only)")
    p.add_argument("--purge", action="store_true", help="forget the runs too: details, metrics and tags")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cleanup.cmd_clean)

    p = add_parser("download", help="download a run's files (outputs, logs, uploads)")
    p.add_argument("run")
    p.add_argument("--prefix", help="only files whose name starts with this, e.g. outputs/")
    p.add_argument("-o", "--output", default=".", help="directory to write into (default .)")
    p.set_defaults(func=cmd_download)

    p = add_parser("events", help="lifecycle events: the history, then (with --follow) new ones as they happen")
    p.add_argument("--since", type=int, default=0, help="only events after this seq (default 0: all kept)")
    p.add_argument("--run", help="only this run's events")
    p.add_argument("-e", "--experiment")
    p.add_argument("--type", action="append", help="only events of this type, e.g. run.completed (repeatable)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    _json_options(p, "an array of the events (not with --follow)", "one event per line, as they come")
    p.set_defaults(func=cmd_events)

    p = add_parser("status", help="the agent's capacity, what is in use, and by whom")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = add_parser("ui", help="print the MLflow UI's URL (starts a per-user agent's embedded MLflow server)")
    p.add_argument("--no-start", action="store_true", help="only print the URL of a server already configured")
    p.add_argument("--timeout", type=_duration, default=120, help="how long to wait for the server to answer")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ui)

    # Everything after "agent" is labrund's (--socket, --config, --help...): "+" marks no option of this parser.
    p = add_parser("agent", help="run the agent in the foreground (same options as labrund); "
                                 "'agent drain [--no-wait]' and 'agent resume' for maintenance",
                   prefix_chars="+", add_help=False)
    p.add_argument("agent_args", nargs=REMAINDER)
    p.set_defaults(func=cmd_agent)

    p = add_parser("completion", help="print the shell completion script: eval \"$(labrun completion bash)\"")
    p.add_argument("shell", choices=["bash", "zsh"])
    p.set_defaults(func=cmd_completion)

    # Hidden (no help): what the completion scripts call with the words typed so far.
    p = add_parser("__complete")
    p.add_argument("words", nargs=REMAINDER)
    p.set_defaults(func=cmd_complete)


def _json_options(parser: argparse.ArgumentParser, json_shape: str, jsonl_shape: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help=f"one JSON document: {json_shape}")
    group.add_argument("--jsonl", action="store_true", help=f"JSON lines: {jsonl_shape}")


def _command_word(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names, if it names one before any option other than --socket."""
    words = iter(argv)
    for word in words:
        if word == "--socket":
            next(words, None)
        elif not word.startswith("--socket="):
            return None if word.startswith("-") else word
    return None


def _parse_args(argv: list[str]):
    """The command line's arguments: by the fast path where it can read them, else by argparse (which also
    prints help and usage errors, and exits)."""
    args = _args.parse(argv, _define)
    if args is None:
        parser = build_parser(_command_word(argv))
        if not parser.built:   # not a subcommand: the full parser says so, with the choices
            parser = build_parser()
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    if getattr(args, "agent_args", None) and args.agent_args[0] == "--":
        args.agent_args = args.agent_args[1:]
    try:
        return args.func(args)
    except UsageError as exc:
        sys.stderr.write(f"labrun: {exc}\n")   # as argparse's parser.exit(2, message)
        sys.exit(2)
    except (AgentError, AzureMLException) as exc:
        message = exc.message if isinstance(exc, AgentError) else str(exc)
        print(f"labrun: {_format.escape(message)}", file=sys.stderr)
        return EXIT_LABRUN
    except BrokenPipeError:
        # The reader went away (| head): exit as a shell reports a process that SIGPIPE ended, and keep
        # Python's final flush of stdout from failing again.
        import signal

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
