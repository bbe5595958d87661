"""The CLI builds only the parser of the subcommand it runs; help, errors and completion still see them all."""

import pytest

from labrun import cli
from labrun.cli import _completion

COMMANDS = ["run", "submit", "ls", "show", "logs", "cancel", "wait", "metrics", "rm", "clean", "download", "events",
            "status", "ui", "agent", "completion"]


@pytest.mark.parametrize("argv, word", [
    (["submit", "--", "true"], "submit"),
    (["--socket", "/tmp/a.sock", "ls", "--all"], "ls"),
    (["--socket=/tmp/a.sock", "wait", "r1"], "wait"),
    (["--help"], None),
    (["--version"], None),
    ([], None),
])
def test_the_command_word_is_the_first_word_after_the_socket(argv, word):
    assert cli._command_word(argv) == word


def test_only_the_command_that_runs_is_built_and_it_parses_as_the_full_parser_does():
    argv = ["submit", "--cpus", "2", "--memory", "1G", "-e", "exp", "--", "echo", "hi"]
    lean, full = cli.build_parser("submit"), cli.build_parser()
    assert lean.built and vars(lean.parse_args(argv)) == vars(full.parse_args(argv))
    subcommands = _completion._subcommands(lean)
    assert list(subcommands) == ["submit"]
    assert not cli.build_parser("no-such-command").built


def test_help_and_completion_list_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = capsys.readouterr().out
    assert all(f"    {name}" in help_text for name in COMMANDS)
    assert cli.main(["__complete", "--", ""]) == 0
    assert set(COMMANDS) <= set(capsys.readouterr().out.split())


def test_an_unknown_command_is_named_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["sumbit", "--", "true"])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'sumbit'" in error and "submit" in error and "events" in error


def test_a_submit_imports_nothing_it_does_not_use():
    """argparse's formatter would import shutil, the JSON output json; a submit needs neither."""
    import subprocess
    import sys

    code = ("import sys\nfrom labrun import cli\n"
            "cli.build_parser('submit').parse_args(['submit', '--cpus', '2', '--', 'true'])\n"
            "import labrun._workspace, labrun._snapshot, labrun._script_run_config\n"
            "print(' '.join(m for m in ('shutil', 'json', 'typing') if m in sys.modules))\n")
    baseline = subprocess.run([sys.executable, "-c", "import sys; print(' '.join(sorted(sys.modules)))"],
                              capture_output=True, text=True, check=True).stdout.split()
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert [m for m in loaded if m not in baseline] == []
