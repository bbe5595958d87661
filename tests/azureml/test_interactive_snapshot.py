"""``Experiment.start_logging(snapshot_directory=...)`` snapshots that directory, as Azure ML does, through the
same manifest and content store as a submit: ``restore_snapshot()`` gives the source back."""

import zipfile

import pytest

from labrun import Experiment, Run, ScriptRunConfig
from labrun.exceptions import SnapshotException

pytestmark = pytest.mark.slow


def project(root, files: dict):
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def restored(run, tmp_path) -> dict:
    with zipfile.ZipFile(run.restore_snapshot(path=str(tmp_path / "restored"))) as archive:
        return {name: archive.read(name).decode() for name in archive.namelist()}


def test_start_logging_snapshots_the_directory_it_is_given(agent, tmp_path, monkeypatch):
    source = project(tmp_path / "notebook", {"train.ipynb": "{}", "data/rows.csv": "a,b\n1,2\n",
                                             ".amlignore": "secret.txt\n", "secret.txt": "not this"})
    monkeypatch.chdir(tmp_path)
    experiment = Experiment(agent.workspace(), "inline")
    run = experiment.start_logging(snapshot_directory=str(source))
    run.log("loss", 0.5)
    run.complete()
    assert restored(run, tmp_path) == {".amlignore": "secret.txt\n", "data/rows.csv": "a,b\n1,2\n",
                                       "train.ipynb": "{}"}
    assert run.get_details()["warnings"] == []
    # The store's copy, not the directory: later edits do not change it.
    (source / "train.ipynb").write_text("changed")
    again = Run.get(agent.workspace(), run.id)
    assert restored(again, tmp_path / "later")["train.ipynb"] == "{}"
    # The same source submitted has the same snapshot: one tree in the content store.
    (source / "train.ipynb").write_text("{}")
    submitted = experiment.submit(ScriptRunConfig(str(source), command="true"))
    assert submitted.get_snapshot_id() == run.get_snapshot_id()
    submitted.wait_for_completion()

    # The default is the current directory; None takes no snapshot.
    monkeypatch.chdir(source)
    default = experiment.start_logging()
    assert set(restored(default, tmp_path / "default")) == {".amlignore", "data/rows.csv", "train.ipynb"}
    none = experiment.start_logging(snapshot_directory=None)
    with pytest.raises(SnapshotException, match="interactive and was started without a snapshot_directory"):
        none.restore_snapshot()
    # Child runs take none, as in Azure ML.
    with pytest.raises(SnapshotException, match="interactive"):
        default.child_run("child").restore_snapshot()


def test_a_directory_over_the_agents_limits(make_agent, tmp_path, monkeypatch, capsys):
    agent = make_agent("[snapshot]\nmax_files = 5\nmax_bytes = \"1M\"\n")
    experiment = Experiment(agent.workspace(), "limits")
    near = project(tmp_path / "near", {f"f{i}.txt": str(i) for i in range(4)})
    over = project(tmp_path / "over", {f"f{i}.txt": str(i) for i in range(9)})

    warned = experiment.start_logging(snapshot_directory=str(near))
    assert [w["source"] for w in warned.get_details()["warnings"]] == ["snapshot"]
    assert len(restored(warned, tmp_path)) == 4

    # Given, it is an error, as in Azure ML; the current directory by default is not: no snapshot, and a warning.
    with pytest.raises(SnapshotException, match="more than 5 files"):
        experiment.start_logging(snapshot_directory=str(over))
    monkeypatch.chdir(over)
    capsys.readouterr()
    run = experiment.start_logging()
    assert run.get_status() == "Running"
    assert "start_logging() takes no snapshot of the current directory" in capsys.readouterr().err
    with pytest.raises(SnapshotException, match="without a snapshot_directory"):
        run.restore_snapshot()
    run.complete()


def test_an_agent_that_takes_no_interactive_snapshot(agent, tmp_path, monkeypatch):
    """An older agent refuses the unknown ``snapshot`` argument: the default snapshot is then left out."""
    from labrun import _hierarchy
    from labrun.exceptions import BadRequest

    real = _hierarchy.start_run

    def older_agent(*args, snapshot_directory=None, **kwargs):
        if snapshot_directory is not None:
            raise BadRequest("args: unknown field 'snapshot'", details={"field": "args.snapshot"})
        return real(*args, **kwargs)

    monkeypatch.setattr(_hierarchy, "start_run", older_agent)
    monkeypatch.chdir(project(tmp_path / "cwd", {"a.txt": "a"}))
    experiment = Experiment(agent.workspace(), "older")
    run = experiment.start_logging()
    assert run.get_status() == "Running"
    with pytest.raises(BadRequest, match="unknown field"):
        experiment.start_logging(snapshot_directory=".")
    run.complete()
