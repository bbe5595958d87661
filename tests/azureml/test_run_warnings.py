"""``get_details()["warnings"]``: Azure ML's list of ``{"source", "message"}``, filled with what labrun has to
warn of (the environment builds' warnings are checked in test_environments)."""

import io
import sys
import textwrap

import pytest

from labrun import Experiment, ScriptRunConfig

pytestmark = pytest.mark.slow


def test_a_snapshot_near_the_agents_limits_and_background_processes_are_warned_of(make_agent, tmp_path,
                                                                                   monkeypatch):
    agent = make_agent("[snapshot]\nmax_files = 5\nmax_bytes = \"1M\"\n")
    source = tmp_path / "src"
    source.mkdir()
    for i in range(4):
        (source / f"data{i}.txt").write_text("x")
    experiment = Experiment(agent.workspace(), "warned")
    # Four files of five, and a process the program leaves running when it ends.
    run = experiment.submit(ScriptRunConfig(str(source), command="sleep 60 >/dev/null 2>&1 & echo started"))
    shown = io.StringIO()
    monkeypatch.setattr(sys, "stdout", shown)
    details = run.wait_for_completion(show_output=True)
    monkeypatch.undo()
    assert details["status"] == "Completed"
    assert [w["source"] for w in details["warnings"]] == ["run", "snapshot"]
    run_warning, snapshot_warning = (w["message"] for w in details["warnings"])
    assert run_warning.startswith("Run: 1 background process(es) of the run were still running when its program "
                                  "ended; labrun ended them")
    assert snapshot_warning.startswith("Snapshot: 4 files, near this agent's limit of 5 ([snapshot] max_files)")
    # wait_for_completion(show_output=True) prints them after the summary, as Azure ML does.
    summary = shown.getvalue().split("Execution Summary", 1)[1]
    assert f"Warnings:\n{run_warning}\n{snapshot_warning}\n" in summary

    # Near the byte limit with fewer files; then nothing to warn of; and warnings never come from a client.
    (source / "data2.txt").unlink()
    (source / "data3.txt").unlink()
    (source / "big.bin").write_bytes(b"\0" * 900_000)
    quiet = experiment.submit(ScriptRunConfig(str(source), command="true"))
    details = quiet.wait_for_completion()
    assert [w["message"].split(",")[0] for w in details["warnings"]] == ["Snapshot: 0.9 MB"]
    (source / "big.bin").unlink()
    plain = experiment.submit(ScriptRunConfig(str(source), command="true"))
    assert plain.wait_for_completion()["warnings"] == []
    from labrun.exceptions import BadRequest

    with pytest.raises(BadRequest, match="args.kind"):
        agent.workspace()._call("set_labels", run_id=plain.id, kind="warnings", values={"x": "forged"})


def test_a_program_that_waits_for_its_children_gets_no_warning(agent, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.py").write_text(textwrap.dedent("""
        import subprocess
        subprocess.run(["sleep", "0.1"], check=True)
    """))
    run = Experiment(agent.workspace(), "quiet").submit(ScriptRunConfig(str(source), script="train.py"))
    assert run.wait_for_completion()["warnings"] == []
