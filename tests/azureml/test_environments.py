"""Environments in the shape of Microsoft's v1 samples: CondaDependencies.create, and a scikit-learn training
with arguments and a pip environment. Built environments get the labrun client without listing it."""

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from labrun import Environment, Experiment, ScriptRunConfig
from labrun.conda_dependencies import CondaDependencies
from labrun.protocol import _conda
from tests.e2e.test_azureml import _wheel

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
NO_CONDA = shutil.which("conda") is None and shutil.which("micromamba") is None

TRAIN = textwrap.dedent("""
    import sys
    import labrun, tinypkg
    from labrun import Run
    run = Run.get_context()
    run.log("value", tinypkg.VALUE)
    print("labrun from", labrun.__file__)
    print("python", sys.prefix)
""")


def _offline(cd: CondaDependencies, wheels: Path) -> CondaDependencies:
    cd.set_pip_option("--no-index")
    cd.set_pip_option(f"--find-links {wheels}")
    return cd


def _build_log(run, tmp_path) -> str:
    return Path(run.download_file("user_logs/environment_build.txt", str(tmp_path / f"{run.id}.txt"))).read_text()


def test_conda_dependencies_round_trip(tmp_path):
    cd = CondaDependencies.create(pip_packages=["azureml-defaults", "scikit-learn==1.5.0"],
                                  conda_packages=["numpy=1.26", "pip"], python_version="3.11")
    cd.add_channel("conda-forge")
    cd.add_pip_package("joblib")
    cd.remove_pip_package("scikit-learn")
    cd.add_conda_package("scipy")
    cd.remove_conda_package("numpy")
    path = cd.save_to_file(str(tmp_path), conda_file_path="myenv.yml")
    loaded = CondaDependencies(conda_dependencies_file_path=path)
    assert loaded == cd and loaded.get_python_version() == "3.11"
    assert list(loaded.pip_packages) == ["azureml-defaults", "joblib"]
    assert list(loaded.conda_packages) == ["pip", "scipy"] and "conda-forge" in loaded.conda_channels
    env = Environment.from_conda_specification("from-file", path)
    assert env.python.conda_dependencies.serialize_to_string() == cd.serialize_to_string()
    # Azure ML's untouched default builds nothing; an edited one does.
    assert Environment("plain")._to_wire()["python"]["conda_specification"] is None
    plain = Environment("edited")
    plain.python.conda_dependencies.add_pip_package("joblib")
    assert "joblib" in plain._to_wire()["python"]["conda_specification"]


@pytest.mark.slow
@pytest.mark.skipif(not NO_CONDA, reason="checks the build without conda or micromamba")
def test_conda_dependencies_create_without_conda(agent, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.py").write_text(TRAIN)
    myenv = Environment(name="myenv")
    myenv.python.conda_dependencies = _offline(
        CondaDependencies.create(conda_packages=["tinypkg=1.0"], pip_packages=["azureml-defaults"],
                                 python_version=PYTHON), wheels)
    run = Experiment(agent.workspace(), "conda-env").submit(
        ScriptRunConfig(source_directory=str(source), script="train.py", environment=myenv))
    assert run.wait_for_completion(raise_on_error=False)["status"] == "Completed", run.get_log()
    assert run.get_metrics() == {"value": "tiny-ok"}
    log = run.get_log()
    # The client came from the environment's own copy, not from the submitting interpreter's packages.
    assert f"labrun from {agent.state_dir / 'envs'}" in log and "labrun-client" in log
    build = _build_log(run, tmp_path)
    assert "installing the conda packages tinypkg=1.0 with pip under the same names" in build
    assert "leaving out azureml-defaults: the labrun client stands in for it" in build
    assert "pins python" not in build
    # Azure ML's warnings say so too, for this run and for a run that reuses the environment.
    again = Experiment(agent.workspace(), "conda-env").submit(
        ScriptRunConfig(source_directory=str(source), script="train.py", environment=myenv))
    assert again.wait_for_completion(raise_on_error=False)["status"] == "Completed"
    assert "reusing environment myenv" in _build_log(again, tmp_path)
    for details in (run.get_details(), again.get_details()):
        assert details["warnings"] == [{"source": "environment", "message": (
            "Environment build: no conda or micromamba on this machine: installing the conda packages "
            "tinypkg=1.0 with pip under the same names.")}]


@pytest.mark.slow
@pytest.mark.skipif(not NO_CONDA, reason="checks the build without conda or micromamba")
def test_a_missing_package_fails_the_build_naming_it_and_a_missing_python_is_reported(agent, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.py").write_text("print('never')\n")
    env = Environment("missing")
    env.python.conda_dependencies = _offline(
        CondaDependencies.create(conda_packages=["no-such-conda-package"], python_version="3.1"), tmp_path)
    run = Experiment(agent.workspace(), "conda-env").submit(
        ScriptRunConfig(source_directory=str(source), script="train.py", environment=env))
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Failed" and run._details["reason"] == "environment_build_failed"
    assert "pip cannot find the package 'no-such-conda-package'" in details["error"]["error"]["message"]
    build = _build_log(run, tmp_path)
    assert "the specification pins python=3.1, and this machine has no working python3.1" in build
    # A failed build's warnings are kept: they may say why it failed.
    assert [w["message"].split(":")[1].strip() for w in details["warnings"]] == [
        "no conda or micromamba on this machine", "the specification pins python=3.1, and this machine has no "
        "working python3.1 (with venv)"]


SKLEARN_TRAIN = textwrap.dedent("""
    import argparse, os
    import joblib
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC
    from labrun import Run

    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel", type=str, default="linear")
    parser.add_argument("--penalty", type=float, default=1.0)
    args = parser.parse_args()
    run = Run.get_context()
    run.log("Kernel type", str(args.kernel))
    run.log("Penalty", float(args.penalty))
    X, y = make_classification(n_samples=300, n_features=8, random_state=0)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0)
    model = SVC(kernel=args.kernel, C=args.penalty).fit(X_train, y_train)
    accuracy = model.score(X_test, y_test)
    print("Accuracy of SVM classifier on test set: {:.2f}".format(accuracy))
    run.log("Accuracy", float(accuracy))
    os.makedirs("outputs", exist_ok=True)
    joblib.dump(model, "outputs/model.joblib")
""")


@pytest.mark.slow
def test_scikit_learn_with_arguments_and_a_pip_environment(agent, tmp_path):
    """scikit-learn comes from PyPI (the one download of the suite; pip's cache keeps it fast after the first)."""
    source = tmp_path / "train-sklearn"
    source.mkdir()
    (source / "train_iris.py").write_text(SKLEARN_TRAIN)
    (tmp_path / "requirements.txt").write_text("azureml-defaults\nscikit-learn\njoblib\n")
    sklearn_env = Environment.from_pip_requirements(name="sklearn-env", file_path=str(tmp_path / "requirements.txt"))
    src = ScriptRunConfig(source_directory=str(source), script="train_iris.py",
                          arguments=["--kernel", "linear", "--penalty", 1.0], environment=sklearn_env)
    run = Experiment(agent.workspace(), "train-sklearn").submit(src)
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Completed", _build_log(run, tmp_path) + run.get_log()
    metrics = run.get_metrics()
    assert metrics["Kernel type"] == "linear" and metrics["Penalty"] == 1.0 and 0.5 < metrics["Accuracy"] <= 1.0
    assert "outputs/model.joblib" in run.get_file_names()
    assert details["runDefinition"]["arguments"] == ["--kernel", "linear", "--penalty", 1.0]
    assert "Accuracy of SVM classifier on test set" in run.get_log()


def test_a_curated_environment_says_what_to_do(agent):
    from labrun.exceptions import NotFound

    with pytest.raises(NotFound, match="curated environments are not on this machine"):
        Environment.get(workspace=agent.workspace(), name="AzureML-sklearn-0.24-ubuntu18.04-py37-cpu")


@pytest.mark.slow
def test_with_micromamba_the_specification_goes_to_it(make_agent, tmp_path):
    """The conda tool's command line and the specification it gets. No conda tool can be installed in CI, so a
    stand-in named micromamba records both and makes the prefix a virtualenv."""
    tools = tmp_path / "tools"
    tools.mkdir()
    record = tmp_path / "micromamba-args"
    (tools / "micromamba").write_text(
        "#!/bin/sh\n"
        f"echo \"$@\" > {record}\n"
        "while [ $# -gt 0 ]; do case \"$1\" in --prefix) prefix=$2; shift;; --file) file=$2; shift;; esac; shift; done\n"
        f"cp \"$file\" {record}.yml\n"
        f"exec {sys.executable} -m venv \"$prefix\"\n")
    (tools / "micromamba").chmod(0o755)
    agent = make_agent(start=False)
    agent.env["PATH"] = f"{tools}:{agent.env['PATH']}"
    agent.start()
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.py").write_text("import labrun\nprint('labrun from', labrun.__file__)\n")
    env = Environment("mamba")
    env.python.conda_dependencies = CondaDependencies.create(conda_packages=["numpy=1.26"],
                                                             pip_packages=["azureml-defaults", "joblib"])
    run = Experiment(agent.workspace(), "mamba").submit(
        ScriptRunConfig(source_directory=str(source), script="train.py", environment=env))
    assert run.wait_for_completion(raise_on_error=False)["status"] == "Completed", _build_log(run, tmp_path)
    arguments = record.read_text().split()
    assert arguments[:3] == ["create", "--yes", "--prefix"] and arguments[4] == "--file"
    from labrun.protocol import _conda

    given = _conda.parse((tmp_path / "micromamba-args.yml").read_text())
    assert given["conda"] == ["python=3.10.18", "numpy=1.26", "pip"] and given["pip"] == ["joblib"]
    assert "labrun-client" in run.get_log()


# A stand-in for conda or micromamba (no conda channel is reachable here): it records how it was called and
# the specification it was given, and makes a working environment at the prefix (a virtualenv holding a
# module the run imports, so the run proves it used that prefix).
STAND_IN = """#!{python}
import json, os, subprocess, sys
argv = sys.argv[1:]
prefix, spec = argv[argv.index("--prefix") + 1], argv[argv.index("--file") + 1]
with open({record!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv, "spec": open(spec).read()}}) + "\\n")
subprocess.run([sys.executable, "-m", "venv", "--without-pip", prefix], check=True)
purelib = subprocess.run([os.path.join(prefix, "bin", "python"), "-c",
                          "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
with open(os.path.join(purelib, "from_conda.py"), "w") as f:
    f.write("MADE_BY = 'the conda stand-in'\\n")
"""

CONDA_TRAIN = textwrap.dedent("""
    import sys
    import from_conda
    from labrun import Run
    Run.get_context().log("prefix", sys.prefix)
    print(from_conda.MADE_BY)
""")


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["micromamba", "conda"])
def test_conda_dependencies_are_built_with_conda_or_micromamba_when_the_machine_has_one(make_agent, tmp_path, tool):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.jsonl"
    (bin_dir / tool).write_text(STAND_IN.format(python=sys.executable, record=str(record)))
    (bin_dir / tool).chmod(0o755)
    agent = make_agent(start=False)
    # Only the stand-in: a conda the machine may have elsewhere (/opt/conda/bin...) must not be found first.
    agent.env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    agent.start()
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.py").write_text(CONDA_TRAIN)
    cd = CondaDependencies.create(conda_packages=["tinypkg=1.0"], pip_packages=["azureml-defaults", "joblib"],
                                  python_version="3.10")
    cd.add_channel("conda-forge")
    env = Environment("with-conda")
    env.python.conda_dependencies = cd
    experiment = Experiment(agent.workspace(), "conda-tool")
    runs = [experiment.submit(ScriptRunConfig(source_directory=str(source), script="train.py", environment=env))
            for _ in range(2)]
    for run in runs:
        details = run.wait_for_completion(raise_on_error=False)
        assert details["status"] == "Completed", _build_log(run, tmp_path) + run.get_log()
        assert "the conda stand-in" in run.get_log() and details["warnings"] == []

    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 1   # built once, reused by the second run
    argv = calls[0]["argv"]
    prefix = argv[argv.index("--prefix") + 1]
    expected = ["create"] if tool == "micromamba" else ["env", "create"]
    assert argv == [str(bin_dir / tool), *expected, "--yes", "--prefix", prefix, "--file", argv[-1]]
    # The run used that prefix's interpreter.
    assert {run.get_metrics()["prefix"] for run in runs} == {prefix}
    spec = _conda.parse(calls[0]["spec"])
    assert "conda-forge" in spec["channels"]
    assert "python=3.10" in spec["conda"] and "tinypkg=1.0" in spec["conda"]   # the pin is conda's to honour
    assert "joblib" in spec["pip"] and not any(p.startswith("azureml") for p in spec["pip"])
    build = _build_log(runs[0], tmp_path)
    assert f"$ {bin_dir / tool} {' '.join(expected)} --yes --prefix {prefix}" in build
    assert "with pip under the same names" not in build and "pins python" not in build
    assert "reusing environment with-conda" in _build_log(runs[1], tmp_path)

    # A specification that names no python gets one: the run and the labrun client need an interpreter there.
    (tmp_path / "bare.yml").write_text("name: bare\ndependencies:\n- tinypkg=1.0\n")
    bare = Environment.from_conda_specification("conda-no-python", str(tmp_path / "bare.yml"))
    run = experiment.submit(ScriptRunConfig(source_directory=str(source), script="train.py", environment=bare))
    assert run.wait_for_completion(raise_on_error=False)["status"] == "Completed", _build_log(run, tmp_path)
    spec = _conda.parse(json.loads(record.read_text().splitlines()[-1])["spec"])
    assert spec["conda"] == ["tinypkg=1.0", "python"]
    assert "the specification names no python: adding python to it" in _build_log(run, tmp_path)
