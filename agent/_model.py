"""The agent's record of one run, and how it is shown to clients."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunRecord:
    run_id: str
    order: int                 # submit order, stable across restarts
    experiment: str
    number: int
    uid: int
    gid: int
    user: str
    status: str
    spec: dict                 # the validated spec, without the snapshot bytes and environ
    environ: dict              # the client's captured environment: may hold secrets
    submitted_at: float
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    error: str | None = None
    pid: int | None = None
    allocation: dict | None = None
    handle: dict | None = None   # the executor's persisted handle (pid and start time, container id)
    waiting: dict | None = field(default=None, compare=False)   # why a queued run waits; not persisted

    def public(self, *, privileged: bool) -> dict:
        """The run as a client sees it. Environments are shown to the owner and admins only."""
        spec = self.spec
        shown = {
            "run_id": self.run_id,
            "order": self.order,
            "number": self.number,
            "experiment": self.experiment,
            "display_name": spec.get("display_name") or self.run_id,
            "status": self.status,
            "user": self.user,
            "uid": self.uid,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "reason": self.reason,
            "error": self.error,
            "script": spec.get("script"),
            "arguments": spec.get("arguments", []),
            "command": spec.get("command"),
            "target": spec.get("compute_target", "local"),
            "max_run_duration_seconds": spec.get("max_run_duration_seconds"),
            "resources": spec.get("resources"),
            "priority": spec.get("priority", 0),
            "tags": spec.get("tags", {}),
            "properties": spec.get("properties", {}),
            "allocation": self.allocation,
            "waiting": self.waiting,
            "after": spec.get("after", []),
            "afterok": spec.get("afterok", []),
            # {id, index, size, throttle}: what a Slurm target maps onto sbatch --array=INDEX%THROTTLE
            "array": spec.get("array"),
        }
        environment = spec.get("environment")
        shown["environment"] = environment if privileged or environment is None else \
            {"name": environment["name"], "version": environment.get("version")}
        shown["distributed"] = spec.get("distributed")
        if privileged:
            shown["environment_variables"] = spec.get("environment_variables", {})
        return shown
