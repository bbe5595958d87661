"""End to end through the client library: a real agent process, real runs."""

import os
import time
from pathlib import Path

import pytest

from labrun import Experiment, RunConfiguration, ScriptRunConfig
from labrun.exceptions import ActivityFailedException, ExperimentExecutionException, SnapshotException


def submit(agent, config, name="exp"):
    return Experiment(agent.workspace(), name).submit(config)


def run_dir(agent, run) -> Path:
    return agent.state_dir / "runs" / run.id


def test_script_with_arguments(agent, source):
    """Azure ML's first example: a script with non-string arguments, run with the client's interpreter."""
    arguments = ["--lr", 0.1, "--epochs", 3, "--flag", True]
    run = submit(agent, ScriptRunConfig(str(source), script="train.py", arguments=arguments))
    assert arguments == ["--lr", 0.1, "--epochs", 3, "--flag", True]   # the caller's list is untouched
    details = run.wait_for_completion()
    assert details["status"] == "Completed" and run.get_status() == "Completed"
    log = run.get_log()
    assert "args ['--lr', '0.1', '--epochs', '3', '--flag', 'True']" in log
    assert f"cwd {run_dir(agent, run) / 'snapshot'}" in log
    assert (run_dir(agent, run) / "outputs" / "model.txt").read_text() == "trained"
    assert run.id.startswith("exp_") and run.number == 1
    assert details["runId"] == run.id and details["target"] == "local" and "endTimeUtc" in details
    second = submit(agent, ScriptRunConfig(str(source), script="train.py"))
    assert second.number == 2


def test_command_list_and_shell_string(agent, source):
    """As in Azure ML, a list is joined with spaces and, like a string, runs through /bin/sh -c."""
    listed = submit(agent, ScriptRunConfig(str(source), command=["echo", "$HOME", "a  b"]))
    shelled = submit(agent, ScriptRunConfig(str(source), command="echo one && echo two"))
    listed.wait_for_completion()
    shelled.wait_for_completion()
    assert listed.get_log() == f"{os.environ['HOME']} a b\n"
    assert shelled.get_log() == "one\ntwo\n"


def test_run_environment(agent, source):
    """The run sees the client's environment, its own variables, then labrun's."""
    os.environ["LABRUN_TEST_CLIENT_VAR"] = "from-client"
    try:
        config = ScriptRunConfig(str(source), command="echo $LABRUN_TEST_CLIENT_VAR $MINE $LABRUN_RUN_ID "
                                                      "$LABRUN_EXPERIMENT $LABRUN_SOCKET; test -d \"$LABRUN_OUTPUT_DIR\"")
        config.run_config.environment_variables = {"MINE": "mine"}
        run = submit(agent, config)
    finally:
        del os.environ["LABRUN_TEST_CLIENT_VAR"]
    run.wait_for_completion()
    assert run.get_log().split() == ["from-client", "mine", run.id, "exp", str(agent.socket)]


def test_snapshot_isolation_and_ignore_files(agent, source):
    """A queued or running run never sees later edits; ignored files never reach it."""
    (source / "data.txt").write_text("original")
    (source / "secret.key").write_text("s3cret")
    (source / "cache").mkdir()
    (source / "cache" / "big.bin").write_text("x")
    (source / ".gitignore").write_text("cache/\n")
    (source / ".amlignore").write_text("*.key\n")   # wins over .gitignore, as in Azure ML
    run = submit(agent, ScriptRunConfig(str(source), command="sleep 1; cat data.txt; ls"))
    (source / "data.txt").write_text("edited")
    run.wait_for_completion()
    log = run.get_log()
    assert log.startswith("original")
    assert "secret.key" not in log and "cache" in log and "train.py" in log


def test_labrunignore_wins(agent, source):
    (source / ".labrunignore").write_text("train.py\n")
    (source / ".amlignore").write_text("other\n")
    run = submit(agent, ScriptRunConfig(str(source), command="ls"))
    run.wait_for_completion()
    assert "train.py" not in run.get_log()


def test_large_snapshot_goes_up_in_chunks(agent, source):
    """Over 8 MiB the archive is uploaded in chunks (the frame limit is 16 MiB) and arrives whole."""
    payload = os.urandom(20 * 1024 * 1024)
    (source / "weights.bin").write_bytes(payload)
    run = submit(agent, ScriptRunConfig(str(source), command=["sha256sum", "weights.bin"]))
    run.wait_for_completion()
    import hashlib

    assert run.get_log().split()[0] == hashlib.sha256(payload).hexdigest()


def test_snapshot_limits_are_refused_before_sending(agent, tmp_path):
    many = tmp_path / "many"
    many.mkdir()
    for i in range(2001):
        (many / f"f{i}").write_text("")
    with pytest.raises(SnapshotException, match="more than 2000 files"):
        submit(agent, ScriptRunConfig(str(many), command=["true"]))


def test_failing_run(agent, source):
    run = submit(agent, ScriptRunConfig(str(source), command="echo boom >&2; exit 3"))
    with pytest.raises(ActivityFailedException, match="exited with code 3") as info:
        run.wait_for_completion()
    assert "Activity Failed" in str(info.value)
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Failed" and details["error"]["error"]["exitCode"] == 3
    assert run.get_log() == "boom\n"


def test_killed_by_signal(agent, source):
    run = submit(agent, ScriptRunConfig(str(source), command="kill -9 $$"))
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Failed" and details["error"]["error"]["signal"] == 9


def test_duration_limit(agent, source):
    start = time.monotonic()
    run = submit(agent, ScriptRunConfig(str(source), command=["sleep", "60"], max_run_duration_seconds=1))
    details = run.wait_for_completion()   # Canceled does not raise, as in Azure ML
    assert time.monotonic() - start < 20
    assert details["status"] == "Canceled"
    assert run._details["reason"] == "max_run_duration_exceeded"


def test_missing_script_and_both_command_and_script(agent, source):
    with pytest.raises(ExperimentExecutionException, match="script path doesn't exist"):
        submit(agent, ScriptRunConfig(str(source), script="nope.py"))
    from labrun.exceptions import RunConfigurationException

    with pytest.raises(RunConfigurationException, match="Both 'command' and 'script'"):
        ScriptRunConfig(str(source), script="train.py", command=["ls"])


def test_unknown_compute_target_and_oversized_request(agent, source):
    from labrun.exceptions import BadRequest

    with pytest.raises(BadRequest, match="unknown compute target 'MyCluster'"):
        submit(agent, ScriptRunConfig(str(source), command=["true"], compute_target="MyCluster"))
    with pytest.raises(BadRequest, match="asks for 999 CPUs"):
        submit(agent, ScriptRunConfig(str(source), command=["true"], resources={"cpus": 999}))


def test_run_config_overrides_with_warning(agent, source, caplog):
    rc = RunConfiguration(script="train.py", arguments=["--from-rc"])
    config = ScriptRunConfig(str(source), run_config=rc, compute_target="other")
    assert "following parameters will be ignored" in caplog.text
    run = submit(agent, config)
    run.wait_for_completion()
    assert "args ['--from-rc']" in run.get_log()


def test_get_runs_newest_first(agent, source):
    experiment = Experiment(agent.workspace(), "listing")
    ids = [experiment.submit(ScriptRunConfig(str(source), command=["true"]), tags={"n": str(i)}).id
           for i in range(3)]
    runs = list(experiment.get_runs())
    assert [r.id for r in runs] == ids[::-1]
    assert [r.id for r in experiment.get_runs(tags={"n": "1"})] == [ids[1]]


def test_listing_comes_in_pages(agent, source):
    """A list reply is one frame, so long listings come in pages that clients follow by ``before``."""
    experiment = Experiment(agent.workspace(), "pages")
    ids = [experiment.submit(ScriptRunConfig(str(source), command=["true"])).id for _ in range(5)]
    workspace = agent.workspace()
    first = workspace._call("list", all=True, limit=2)
    assert [r["run_id"] for r in first] == ids[:-3:-1]
    second = workspace._call("list", all=True, limit=2, before=first[-1]["order"])
    assert [r["run_id"] for r in second] == ids[-3:-5:-1]
    assert [r["run_id"] for r in workspace.list_runs(all=True, limit=2)] == ids[::-1]
    assert [r.id for r in experiment.get_runs()] == ids[::-1]
