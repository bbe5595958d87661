"""The import rule: every public azureml.core module and name that user code imports has its labrun twin,
or refuses clearly (and the README says so); ``import labrun`` stays light; offline runs take the live
run's arguments."""

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from labrun._refused import REFUSED, NotSupportedError

HERE = Path(__file__).parent
README = (HERE.parent.parent / "README.md").read_text()


def _names():
    for line in (HERE / "azureml_core_names.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            module, _, names = line.partition(":")
            yield module.strip(), names.split()


def twin(module: str) -> str:
    """The import rule."""
    if module == "azureml.widgets":
        return "labrun.widgets"
    assert module.startswith("azureml.core")
    return "labrun" + module[len("azureml.core"):]


ALL = [(module, name) for module, names in _names() for name in names]


def test_the_list_covers_the_required_modules():
    modules = {module for module, _ in _names()}
    for required in ("runconfig", "workspace", "experiment", "run", "script_run_config", "environment",
                     "conda_dependencies", "compute", "container_registry", "model"):
        assert f"azureml.core.{required}" in modules
    assert len(ALL) > 50


@pytest.mark.parametrize("module,name", ALL, ids=[f"{m}.{n}" for m, n in ALL])
def test_every_name_has_its_twin_or_a_documented_refusal(module, name):
    value = getattr(importlib.import_module(twin(module)), name)
    if name not in REFUSED:
        assert value is not None
        if inspect.isclass(value):
            assert not isinstance(value, type(getattr(importlib.import_module("labrun._refused"), "Model")))
        return
    with pytest.raises(NotSupportedError, match=f"labrun does not provide {name}: it is an Azure ML cloud service"):
        value() if inspect.isfunction(value) else value.some_method
    with pytest.raises(NotSupportedError):
        value()
    assert f"`{name}`" in README, f"the README's list of refusals misses {name}"


def test_twins_are_the_same_objects():
    import labrun
    from labrun.conda_dependencies import CondaDependencies
    from labrun.runconfig import CondaDependencies as FromRunconfig
    from labrun.runconfig import RunConfiguration

    assert RunConfiguration is labrun.RunConfiguration and CondaDependencies is FromRunconfig
    from labrun.run import Run
    from labrun.script_run import ScriptRun

    assert issubclass(ScriptRun, Run) and Run is labrun.Run


def test_import_labrun_is_light():
    code = ("import sys, labrun, labrun.runconfig, labrun.conda_dependencies, labrun.widgets\n"
            "heavy = sorted(m for m in ('trio', 'httpx', 'structlog', 'aiodocker', 'labrun.agent', 'IPython', "
            "'ipywidgets', 'threading', 'pathspec') if m in sys.modules)\n"
            "print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    code = "import sys, labrun; print(sorted(m for m in sys.modules if m.startswith('labrun')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['labrun', 'labrun.protocol', 'labrun.protocol._lazy', 'labrun.protocol._version']"


def test_offline_run_takes_the_live_runs_arguments():
    from labrun._context import OfflineRun
    from labrun._run import Run

    methods = [name for name, _ in inspect.getmembers(Run, inspect.isfunction)
               if name.startswith(("log", "upload", "tag", "set_tags", "add_properties", "flush", "complete",
                                   "fail", "child_run", "cancel"))]
    assert {"log", "log_list", "log_row", "log_table", "log_image", "complete", "fail", "child_run"} <= set(methods)
    for name in methods:
        live = list(inspect.signature(getattr(Run, name)).parameters.values())
        offline = list(inspect.signature(getattr(OfflineRun, name)).parameters.values())
        assert [(p.name, p.kind, p.default) for p in live] == [(p.name, p.kind, p.default) for p in offline], name


def test_offline_log_with_step_prints(capsys):
    from labrun import Run

    run = Run.get_context()
    run.log("loss", 0.5, step=3)
    run.log_row("r", description="d", a=1)
    assert "Attempted to log scalar metric loss:\n0.5 (step 3)" in capsys.readouterr().out
