"""``Experiment``: a named group of runs, and where runs are submitted."""

from __future__ import annotations

from labrun.protocol import EXPERIMENT_NAME_RE

from ._run import ScriptRun
from ._script_run_config import ScriptRunConfig
from ._snapshot import submit_spec
from ._workspace import Workspace
from .exceptions import UserErrorException


class Experiment:
    def __init__(self, workspace: Workspace, name: str, _skip_name_validation=False, **kwargs):
        if not _skip_name_validation and not (isinstance(name, str) and EXPERIMENT_NAME_RE.match(name)):
            raise UserErrorException(
                "Experiment name must be between 1 and 255 characters long. Its first character has to be "
                "alphanumeric, and the rest may contain hyphens and underscores. No whitespace is allowed.")
        self.workspace = workspace
        self.name = name

    @property
    def id(self) -> str:
        return self.name

    def submit(self, config: ScriptRunConfig, tags: dict | None = None, **kwargs) -> ScriptRun:
        """Snapshot ``config.source_directory`` and queue the run; returns once the agent has stored it."""
        if not isinstance(config, ScriptRunConfig):
            raise UserErrorException(f"Experiment.submit takes a ScriptRunConfig, got {type(config).__name__}")
        unknown = set(kwargs) - {"run_id", "_parent_run_id", "credential_passthrough"}
        if unknown:
            raise UserErrorException(f"Experiment.submit got an unexpected argument {sorted(unknown)[0]!r}")
        spec = config._to_spec(self.name)
        if tags:
            spec["tags"] = {str(k): "" if v is None else str(v) for k, v in tags.items()}
        details = submit_spec(self.workspace, spec, config.source_directory or ".", in_place=not config.snapshot)
        return ScriptRun(self, details["run_id"], directory=config.source_directory, _details=details)

    def get_runs(self, type=None, tags=None, properties=None, include_children=False, status=None):
        """Runs of this experiment, newest first (a generator, as in Azure ML)."""
        for details in self.workspace.list_runs(all=True, experiment=self.name):
            if status is not None and details["status"] != status:
                continue
            if not _matches(details["tags"], tags) or not _matches(details["properties"], properties):
                continue
            yield ScriptRun(self, details["run_id"], _details=details)

    def __repr__(self) -> str:
        return f"Experiment(Name: {self.name},\nWorkspace: {self.workspace.name})"


def _matches(values: dict, wanted) -> bool:
    if wanted is None:
        return True
    if isinstance(wanted, str):
        return wanted in values
    return all(values.get(k) == v for k, v in wanted.items())
