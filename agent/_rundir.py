"""The run directory's layout: every path inside ``<state>/runs/<run_id>/`` is named here and nowhere else.

::

    <state>/runs/<run_id>/
        snapshot/               the run's working directory (a copy of the source directory)
            outputs/            its ./outputs
        outputs -> snapshot/outputs
        logs/
            std_log.txt         stdout and stderr (rank 0's log, or a link to it, for distributed runs)
            std_log_process_<rank>.txt
            environment_build.txt
        artifacts/              files the run uploaded
        resume_from/            a read-only copy of what the run resumes from
        exit.json               how the run's process ended, written atomically by whoever saw it end
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUNS = "runs"


def runs_root(state_dir: Path) -> Path:
    return state_dir / RUNS


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def of(cls, state_dir: Path, run_id: str) -> "RunDir":
        return cls(runs_root(state_dir) / run_id)

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def snapshot(self) -> Path:
        return self.root / "snapshot"

    @property
    def outputs(self) -> Path:
        return self.snapshot / "outputs"

    @property
    def outputs_link(self) -> Path:
        return self.root / "outputs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def std_log(self) -> Path:
        return self.logs / "std_log.txt"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"std_log_process_{rank}.txt"

    @property
    def environment_log(self) -> Path:
        return self.logs / "environment_build.txt"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def resume_from(self) -> Path:
        return self.root / "resume_from"

    @property
    def exit_status(self) -> Path:
        return self.root / "exit.json"
