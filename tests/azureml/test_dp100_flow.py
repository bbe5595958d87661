"""The DP-100 course's notebook flow ("train models with the SDK"), with only the import lines changed and a
synthetic CSV in place of the course's data: an inline experiment with start_logging, RunDetails, a script
run with arguments, its outputs and metrics, listing past runs, and the model registry's clear refusal."""

import csv
import os
import random
import textwrap
from pathlib import Path

import pytest

import labrun
from labrun import Environment, Experiment, ScriptRunConfig, Workspace
from labrun.exceptions import UserErrorException
from labrun.widgets import RunDetails, render_html

TRAINING = textwrap.dedent("""
    import argparse, csv, os, pickle
    from labrun import Run

    parser = argparse.ArgumentParser()
    parser.add_argument('--reg-rate', type=float, dest='reg', default=0.01)
    args = parser.parse_args()
    run = Run.get_context()
    with open('diabetes.csv') as f:
        rows = list(csv.DictReader(f))
    run.log('Regularization Rate', float(args.reg))
    run.log('Accuracy', sum(int(r['Diabetic']) for r in rows) / len(rows))
    run.log('AUC', 0.8)
    os.makedirs('outputs', exist_ok=True)
    with open('outputs/diabetes_model.pkl', 'wb') as f:
        pickle.dump({'reg': args.reg}, f)
    run.complete()
""")


def _diabetes_csv(path: Path) -> None:
    random.seed(1)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Pregnancies", "PlasmaGlucose", "Diabetic"])
        for _ in range(120):
            writer.writerow([random.randint(0, 8), random.randint(60, 190), random.randint(0, 1)])


def test_dp100_train_models_flow(agent, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    agent.workspace().write_config()

    # Cell 1: connect.
    ws = Workspace.from_config()
    print("Ready to use Azure ML {} to work with {}".format(labrun.VERSION, ws.name))

    # Cell 2: an inline experiment.
    os.makedirs("data", exist_ok=True)
    _diabetes_csv(Path("data/diabetes.csv"))
    experiment = Experiment(workspace=ws, name="mslearn-diabetes")
    run = experiment.start_logging()
    print("Starting experiment:", experiment.name)
    with open("data/diabetes.csv") as f:
        rows = list(csv.DictReader(f))
    run.log("observations", len(rows))
    pregnancies = sorted({int(r["Pregnancies"]) for r in rows})
    run.log_list("pregnancy categories", pregnancies)
    for column in ("PlasmaGlucose",):
        values = [int(r[column]) for r in rows]
        run.log_row(column, min=min(values), max=max(values), mean=sum(values) / len(values))
    with open("sample.csv", "w") as f:
        f.write("Pregnancies,PlasmaGlucose\n1,100\n")
    run.upload_file(name="outputs/sample.csv", path_or_stream="./sample.csv")
    run.complete()

    RunDetails(run).show()
    shown = capsys.readouterr().out
    assert "Ready to use Azure ML 0." in shown and "Completed" in shown
    assert [line.split() for line in shown.splitlines() if line.startswith("metric observations")] == \
        [["metric", "observations", "120"]]
    metrics = run.get_metrics()
    assert metrics["observations"] == 120 and metrics["pregnancy categories"] == pregnancies
    assert set(metrics["PlasmaGlucose"]) == {"min", "max", "mean"}
    assert "outputs/sample.csv" in run.get_file_names()

    # Cell 3: a script, run with arguments in the submitting environment.
    training_folder = tmp_path / "diabetes-training"
    training_folder.mkdir()
    (training_folder / "diabetes_training.py").write_text(TRAINING)
    (training_folder / "diabetes.csv").write_bytes(Path("data/diabetes.csv").read_bytes())
    env = Environment("user-managed-env")
    env.python.user_managed_dependencies = True
    script_config = ScriptRunConfig(source_directory=str(training_folder), script="diabetes_training.py",
                                    arguments=["--reg-rate", 0.1], environment=env)
    run = experiment.submit(config=script_config)
    assert f"<td>{run.id}</td>" in run._repr_html_() and "Link to the run" in run._repr_html_()
    widget_data = RunDetails(run).get_widget_data()
    assert widget_data["run_id"] == run.id and widget_data["status"] in (
        "Queued", "Preparing", "Starting", "Running", "Finalizing", "Completed")
    run.wait_for_completion()
    metrics = run.get_metrics()
    assert metrics["Regularization Rate"] == 0.1 and metrics["AUC"] == 0.8
    html = render_html(RunDetails(run).get_widget_data())
    assert "<td>Completed</td>" in html and "Regularization Rate" in html

    run.download_files(prefix="outputs", output_directory=str(tmp_path / "downloaded"))
    assert (tmp_path / "downloaded" / "outputs" / "diabetes_model.pkl").is_file()

    # Cell 4: past runs of the experiment, newest first.
    assert [r.get_status() for r in experiment.get_runs()] == ["Completed", "Completed"]
    assert run.get_details()["runDefinition"]["arguments"] == ["--reg-rate", 0.1]

    # Cell 5: registering the model is a cloud service, refused with what to do instead.
    with pytest.raises(UserErrorException, match="keep models as run outputs"):
        run.register_model(model_path="outputs/diabetes_model.pkl", model_name="diabetes_model")

    # restore_snapshot gives the source the run used.
    import zipfile

    with zipfile.ZipFile(run.restore_snapshot(path=str(tmp_path))) as archive:
        assert sorted(archive.namelist()) == ["diabetes.csv", "diabetes_training.py"]
    logs = run.get_details_with_logs()["logFiles"]
    assert logs["user_logs/std_log.txt"] == run.get_log()
