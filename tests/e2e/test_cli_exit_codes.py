"""Every row of the README's exit-code table, through the real CLI against a real agent."""

import pytest

from tests.conftest import REPO, AgentProcess


def readme_rows() -> list[str]:
    """The first cell of each row of the README's exit-code table."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| exit code | meaning |"):].split("\n\n")[0]
    return [line.split("|")[1].strip() for line in table.splitlines()[2:]]


def run(agent, source, *command, options=()):
    return agent.cli("run", "--source-dir", str(source), *options, "--", *command)


def own_code(agent, source):
    result = run(agent, source, "sh", "-c", "exit 2")   # make's 2 is the run's, not bad usage
    assert result.returncode == 2 and "exited with code 2" in result.stderr
    run_id = agent.cli("submit", "--source-dir", str(source), "--", "sh", "-c", "sleep 1; exit 42",
                       check=True).stdout.strip()
    follow = agent.cli("logs", "-f", "--exit-status", run_id)
    assert follow.returncode == 42 and follow.stderr == f"labrun: run {run_id} Failed: exited with code 42\n"
    assert agent.cli("logs", "-f", run_id).returncode == 0   # without --exit-status: the log was printed
    return agent.cli("wait", run_id).returncode == 42


def completed(agent, source):
    return run(agent, source, "true").returncode == 0


def signal(agent, source):
    return run(agent, source, "sh", "-c", "kill -TERM $$").returncode == 128 + 15


def max_duration(agent, source):
    limited = run(agent, source, "sleep", "60", options=("--max-duration", "1s"))
    run_id = agent.cli("submit", "--source-dir", str(source), "--", "sleep", "60", check=True).stdout.strip()
    timed_out = agent.cli("wait", "--timeout", "1", run_id)
    agent.cli("cancel", run_id, check=True)
    return limited.returncode == 124 and timed_out.returncode == 124 and "still" in timed_out.stderr


def canceled(agent, source):
    run_id = agent.cli("submit", "--source-dir", str(source), "--", "sleep", "60", check=True).stdout.strip()
    agent.cli("cancel", run_id, check=True)
    return agent.cli("wait", run_id).returncode == 130


def labrun_failed(agent, source):
    refused = agent.cli("cancel", "no_such_run")
    unknown_dependency = agent.cli("submit", "--source-dir", str(source), "--after", "nope", "--", "true")
    nobody = AgentProcess(agent.root / "none").cli("ls")   # no agent answers there
    return (refused.returncode == unknown_dependency.returncode == nobody.returncode == 125
            and "no run with id" in refused.stderr and "no labrun agent answers" in nobody.stderr)


def cannot_start(agent, source):
    (source / "not-executable").write_text("#!/bin/sh\necho hi\n")
    result = run(agent, source, "./not-executable")
    return result.returncode == 126 and "Permission denied" in result.stderr


def not_found(agent, source):
    result = run(agent, source, "no-such-command-anywhere")
    return result.returncode == 127 and "No such file" in result.stderr


def bad_usage(agent, source):
    results = [agent.cli("submit", "--cpus", "many", "--", "true"), agent.cli("run", "--source-dir", str(source)),
               agent.cli("frobnicate")]
    nothing = agent.cli("ls", "--all", "--json", check=True).stdout
    return all(r.returncode == 2 for r in results) and nothing.strip() == "[]"


SCENARIOS = {
    "0": completed, "the run's own code": own_code, "128+N": signal, "124": max_duration, "130": canceled,
    "125": labrun_failed, "126": cannot_start, "127": not_found, "2": bad_usage,
}


def test_the_table_is_what_is_tested():
    assert readme_rows() == list(SCENARIOS)


@pytest.mark.parametrize("row", list(SCENARIOS))
def test_exit_code(row, agent, source):
    assert SCENARIOS[row](agent, source), row

