"""The CLI's fast path reads a command line exactly as argparse does, or leaves it to argparse."""

import shlex
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labrun import cli
from labrun.cli import _args, _completion


def argparse_reading(argv: list[str]) -> dict | None:
    """argparse's namespace for ``argv`` (None when it refuses it or prints help or the version)."""
    try:
        return vars(cli.build_parser().parse_args(argv))
    except SystemExit:
        return None


def check_same(argv: list[str]) -> bool:
    """Asserts that the fast path agrees with argparse on ``argv``; returns whether it answered at all."""
    fast = _args.parse(argv, cli._define)
    if fast is not None:
        assert vars(fast) == argparse_reading(argv), argv
    return fast is not None


# The README's command lines and the hot paths: the fast path reads each of them, and as argparse does.
FAST = [
    "submit -- true",
    "run -- python train.py --lr 0.01",
    "run --script train.py -- --lr 0.01",
    "run -- 'make -j4 && make test'",
    "submit -e mnist --name try1 --max-duration 2h --env SEED=1 --tag k=v -- python train.py",
    "submit --afterok a_1_x -- python evaluate.py",
    "submit --after a_1_x,b_2_y --after c -- ./notify.sh",
    "submit --array 0-9%2 --script sweep.py",
    "submit --cpus 2 --memory 1G --gpus 1 --priority 3 -- echo hi",
    "submit --source-dir=/tmp/src --in-place --json -- true",
    "submit python train.py --lr 0.1",
    "submit echo --name x",
    "submit --json",
    "run --image pytorch-local:latest --gpus 1 --memory 16G --shm-size 8g -- python train.py",
    "--socket /tmp/a.sock submit -- true",
    "--socket=/tmp/a.sock ls",
    "ls", "ls --all", "ls --tag lr=0.1", "ls -x --json", "ls --all --json", "ls -e exp --jsonl",
    "show r1", "show r1 --json", "show --json r1",
    "logs r1 -f", "logs r1 --exit-status",
    "cancel r1 r2", "wait r1", "wait r1 r2 --timeout 10m --jsonl", "wait --json r1 r2",
    "metrics r1 r2 --json", "download r1 --prefix outputs/ -o out",
    "rm r1 --purge", "clean --older-than 7d --status Completed --status Failed", "clean --all-users",
    "status", "status --json", "events --since 1200 --run r1 --type run.completed", "events --follow --jsonl",
    "completion bash", "ui", "ui --no-start --timeout 5",
]
# Left to argparse: its help, version, errors, abbreviations, and what only it may read.
ARGPARSE = [
    "", "--help", "-h", "--version", "submit --help", "ls -h", "sumbit -- true", "--socket", "--socket -x ls",
    "--sock /x ls", "show", "show r1 r2", "ls --json --jsonl", "ls --al", "submit --cpus two -- true",
    "submit --memory lots -- true", "submit --array 1-x -- true", "submit --name", "submit --name -- true",
    "submit --json=1 -- true", "submit --a 1", "submit echo --a", "submit echo --af x", "submit python x.py -ex",
    "events --since -1", "wait r1 --json r2", "clean --status Bad", "completion fish", "agent --socket x",
    "agent drain --no-wait", "- ls", "ls -", "wait -- r1",
]


@pytest.mark.parametrize("line", FAST)
def test_the_fast_path_reads_the_everyday_command_lines_as_argparse_does(line):
    assert check_same(shlex.split(line))


@pytest.mark.parametrize("line", ARGPARSE)
def test_help_errors_and_oddities_are_left_to_argparse(line):
    assert not check_same(shlex.split(line))


COMMANDS = ["submit", "run", "ls", "show", "logs", "cancel", "wait", "metrics", "rm", "clean", "download", "events",
            "status", "ui", "completion", "agent", "__complete", "sumbit"]
VALUES = ["r1", "r2", "echo", "hi there", "", "-", "--", "-1", "2", "two", "1G", "5m", "1-3%2", "k=v", "Failed",
          "afterok:a", "bash", "/s", "--a", "--e", "-x", "-ex", "--help", "--json"]


@st.composite
def command_lines(draw) -> list[str]:
    """A command word, then its own options (with and without values, whole or abbreviated) and other words."""
    command = draw(st.sampled_from(COMMANDS))
    sub = _completion._subcommands(cli.build_parser()).get(command)
    options = sorted({o for a in sub._actions for o in a.option_strings}) if sub else []
    options = options or ["--json"]
    option = st.sampled_from(options + [o[:3] for o in options if o.startswith("--")])
    value = st.sampled_from(VALUES)
    piece = st.one_of(st.tuples(option), st.tuples(option, value), st.tuples(value),
                      st.tuples(option, value).map(lambda pair: (f"{pair[0]}={pair[1]}",)))
    before = draw(st.sampled_from([[], ["--socket", "/s"], ["--socket=/s"], ["--socket"], ["-h"]]))
    return before + [command] + [word for words in draw(st.lists(piece, max_size=7)) for word in words]


@st.composite
def plain_command_lines(draw) -> list[str]:
    """Mostly well-formed ones: each option with a value where it takes one, positionals, a run's command."""
    command = draw(st.sampled_from(COMMANDS[:15]))
    sub = _completion._subcommands(cli.build_parser())[command]
    pieces = []
    for action in draw(st.lists(st.sampled_from(sub._actions), max_size=6)):
        if not action.option_strings:
            pieces.append(draw(st.lists(st.sampled_from(["r1", "r2", "bash", "echo"]), min_size=1, max_size=2)))
        elif action.nargs == 0:
            pieces.append([draw(st.sampled_from(action.option_strings))])
        else:
            option = draw(st.sampled_from(action.option_strings))
            value = draw(st.sampled_from(["r1", "2", "5m", "1G", "k=v", "Failed", "Completed", "1-3%2", "", "x y",
                                          "afterok:a:b", "bash"]))
            pieces.append(draw(st.sampled_from([[option, value], [f"{option}={value}"]])))
    tail = draw(st.sampled_from([[], ["--", "echo", "--a"], ["python", "x.py", "--lr", "1"], ["--", "--"]]))
    return [command] + [word for words in pieces for word in words] + tail


@settings(max_examples=500, deadline=None)
@given(st.one_of(command_lines(), plain_command_lines()))
def test_any_command_line_reads_as_argparse_reads_it_or_goes_to_argparse(argv):
    check_same(argv)


def test_a_submit_imports_neither_argparse_nor_re_nor_the_socket_module(agent, source):
    """What the fast path is for: a real submit through main(), and what it imported beyond start-up."""
    code = ("import sys\nstarted = set(sys.modules)\nfrom labrun.cli import main\n"
            f"code = main(['submit', '--source-dir', {str(source)!r}, '--cpus', '1', '--', 'true'])\n"
            "print(' '.join(m for m in ('argparse', 're', 'socket', 'enum', 'signal', 'locale', 'json', 'shutil',"
            " 'asyncio', 'typing', 'copy', 'labrun._datapath') if m in set(sys.modules) - started), file=sys.stderr)\n"
            "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", code], env=agent.env, capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("default_") and result.stderr.strip() == ""
