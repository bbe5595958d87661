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


def _under(*parts: str) -> property:
    """A path inside the run directory, as a read-only attribute."""
    return property(lambda self: self.root.joinpath(*parts), doc=f"``<run>/{'/'.join(parts)}``")


@dataclass(frozen=True)
class RunDir:
    root: Path

    snapshot = _under("snapshot")
    outputs = _under("snapshot", "outputs")
    outputs_link = _under("outputs")
    logs = _under("logs")
    std_log = _under("logs", "std_log.txt")
    environment_log = _under("logs", "environment_build.txt")
    artifacts = _under("artifacts")
    resume_from = _under("resume_from")
    exit_status = _under("exit.json")

    @classmethod
    def of(cls, state_dir: Path, run_id: str) -> "RunDir":
        return cls(runs_root(state_dir) / run_id)

    @property
    def run_id(self) -> str:
        return self.root.name

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"std_log_process_{rank}.txt"
