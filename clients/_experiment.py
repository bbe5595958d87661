"""``Experiment``: a named group of runs, and where runs are submitted; ``Experiment.list``, tags and archiving."""

from __future__ import annotations

from labrun.protocol import EXPERIMENT_NAME_RE

from ._run import ScriptRun
from ._script_run_config import ScriptRunConfig
from ._snapshot import submit_spec
from ._workspace import Workspace
from .exceptions import UserErrorException


class ViewType:
    ActiveOnly = "ActiveOnly"
    All = "All"
    ArchivedOnly = "ArchivedOnly"


class Experiment:
    def __init__(self, workspace: Workspace, name: str, _skip_name_validation=False, **kwargs):
        if not _skip_name_validation and not (isinstance(name, str) and EXPERIMENT_NAME_RE.match(name)):
            raise UserErrorException(
                "Experiment name must be between 1 and 255 characters long. Its first character has to be "
                "alphanumeric, and the rest may contain hyphens and underscores. No whitespace is allowed.")
        self.workspace = workspace
        self.name = name
        self._meta = None

    @property
    def id(self) -> str:
        return self.name

    # -- tags and archiving (kept by the agent) --------------------------------------------

    def _metadata(self) -> dict:
        if self._meta is None:
            self.refresh()
        return self._meta

    def refresh(self) -> None:
        found = self.workspace._call("experiments", name=self.name)
        self._meta = found[0] if found else {"name": self.name, "tags": {}, "archived_at": None}

    def _update(self, **changes) -> None:
        self._meta = self.workspace._call("experiment_update", name=self.name, **changes)

    @property
    def tags(self) -> dict:
        return dict(self._metadata().get("tags") or {})

    @property
    def archived_time(self) -> str | None:
        from ._run import _utc

        return _utc(self._metadata().get("archived_at"))

    def tag(self, key, value=None) -> None:
        self.set_tags({key: value})

    def set_tags(self, tags: dict) -> None:
        if not isinstance(tags, dict):
            raise UserErrorException("set_tags takes a dict of tag name -> value")
        self._update(tags={str(k): None if v is None else str(v) for k, v in tags.items()})

    def remove_tags(self, tags) -> None:
        self._update(remove_tags=[str(t) for t in tags])

    def archive(self) -> None:
        self._update(archived=True)

    def reactivate(self, new_name=None) -> None:
        if new_name is not None:
            raise UserErrorException("reactivate: renaming an experiment is not supported")
        self._update(archived=False)

    @staticmethod
    def list(workspace, experiment_name=None, view_type=ViewType.ActiveOnly, tags=None) -> list:
        """The agent's experiments: those with runs, tags or an archive state."""
        found = []
        for entry in _all_experiments(workspace, experiment_name):
            archived = entry.get("archived_at") is not None
            if view_type == ViewType.ActiveOnly and archived or view_type == ViewType.ArchivedOnly and not archived:
                continue
            if experiment_name is not None and entry["name"] != experiment_name:
                continue
            if not _matches(entry.get("tags") or {}, tags):
                continue
            experiment = Experiment(workspace, entry["name"], _skip_name_validation=True)
            experiment._meta = entry
            found.append(experiment)
        return found

    def get_portal_url(self) -> str | None:
        from ._links import experiment_link

        return experiment_link(self)

    # -- runs ------------------------------------------------------------------------------

    def start_logging(self, *args, outputs=None, snapshot_directory=".", run_id=None, display_name=None,
                      description=None, tags=None, **kwargs):
        """An interactive run, ``Running`` until ``complete()``, ``fail()`` or ``cancel()``.

        If this process exits without ending it, the agent marks it ``Failed`` (reason ``client_exited``).
        """
        from ._hierarchy import start_run

        return start_run(self, run_id=run_id, display_name=display_name or kwargs.get("name"),
                         description=description, tags=tags, outputs=outputs)

    def submit(self, config: ScriptRunConfig, tags: dict | None = None, **kwargs) -> ScriptRun:
        """Snapshot ``config.source_directory`` and queue the run; returns once the agent has stored it."""
        if not isinstance(config, ScriptRunConfig):
            raise UserErrorException(f"Experiment.submit takes a ScriptRunConfig, got {type(config).__name__}")
        unknown = set(kwargs) - {"run_id", "_parent_run_id", "credential_passthrough"}
        if unknown:
            raise UserErrorException(f"Experiment.submit got an unexpected argument {sorted(unknown)[0]!r}")
        spec = config._to_spec(self.name)
        if kwargs.get("_parent_run_id") is not None:
            spec["parent_run_id"] = kwargs["_parent_run_id"]
        if kwargs.get("run_id") is not None:
            raise UserErrorException("Experiment.submit: labrun's agent names submitted runs itself; "
                                     "leave run_id unset")
        if tags:
            spec["tags"] = {str(k): "" if v is None else str(v) for k, v in tags.items()}
        details = submit_spec(self.workspace, spec, config.source_directory or ".", in_place=not config.snapshot)
        return ScriptRun(self, details["run_id"], directory=config.source_directory, _details=details)

    def get_runs(self, type=None, tags=None, properties=None, include_children=False, status=None):
        """Runs of this experiment, newest first (a generator, as in Azure ML); children only if asked."""
        from ._hierarchy import run_from_details

        for details in self.workspace.list_runs(all=True, experiment=self.name):
            if status is not None and details["status"] != status:
                continue
            if details.get("parent_run_id") is not None and not include_children:
                continue
            if not _matches(details["tags"], tags) or not _matches(details["properties"], properties):
                continue
            run = run_from_details(self.workspace, details, self)
            if type is None or run.type == type:
                yield run

    def __repr__(self) -> str:
        return f"Experiment(Name: {self.name},\nWorkspace: {self.workspace.name})"


def _all_experiments(workspace, name=None):
    """The agent's experiments (only ``name``, when given), following its pages."""
    if name is not None:
        yield from workspace._call("experiments", name=name)
        return
    after = None
    while page := workspace._call("experiments", after=after):
        yield from page
        after = page[-1]["name"]


def _matches(values: dict, wanted) -> bool:
    if wanted is None:
        return True
    if isinstance(wanted, str):
        return wanted in values
    return all(values.get(k) == v for k, v in wanted.items())
