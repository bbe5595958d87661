"""A real ``mlflow server`` (MLflow from PyPI) on 127.0.0.1 for tests, and reads through its REST API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class MlflowServer:
    """One server with its SQLite store and artifacts under ``root``; stop and start keep both and the port.

    ``host``: the address it listens on (``0.0.0.0``: every one); the URL is 127.0.0.1's either way.
    """

    def __init__(self, root: Path, host: str = "127.0.0.1"):
        self.root = root
        self.host = host
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        from tests.conftest import spawn_until

        self.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.process = spawn_until(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", self.host, "--port",
             str(self.port), "--workers", "1"],
            self.root / "server.log", lambda: answers(self.url), START_TIMEOUT, "mlflow server", env=env,
            start_new_session=True, cwd=self.root)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None
        deadline = time.monotonic() + 20
        while answers(self.url) and time.monotonic() < deadline:   # the web server is a child: let it go
            time.sleep(0.1)


class MlflowApi:
    """Reads through MLflow's REST API, as any MLflow user's tools would."""

    def __init__(self, url: str):
        self.base = f"{url}/api/2.0/mlflow/"

    def get(self, endpoint: str, **params) -> dict:
        response = httpx.get(self.base + endpoint, params=params, timeout=30)
        response.raise_for_status()
        return response.json()

    def run_by_labrun_id(self, run_id: str) -> dict | None:
        experiments = httpx.post(self.base + "experiments/search", json={"max_results": 1000},
                                 timeout=30).json().get("experiments", [])
        found = httpx.post(self.base + "runs/search", timeout=30, json={
            "experiment_ids": [e["experiment_id"] for e in experiments],
            "filter": f"tags.`labrun.run_id` = '{run_id}'", "run_view_type": "ALL"}).json().get("runs", [])
        assert len(found) <= 1, f"{len(found)} MLflow runs for {run_id}"
        return found[0] if found else None

    def search_children(self, experiment_id: str, parent_mlflow_id: str) -> list[dict]:
        return httpx.post(self.base + "runs/search", timeout=30, json={
            "experiment_ids": [experiment_id],
            "filter": f"tags.`mlflow.parentRunId` = '{parent_mlflow_id}'"}).json().get("runs", [])

    def run(self, mlflow_run_id: str) -> dict:
        return self.get("runs/get", run_id=mlflow_run_id)["run"]

    def history(self, mlflow_run_id: str, key: str) -> list[tuple[int, float]]:
        points = self.get("metrics/get-history", run_id=mlflow_run_id, metric_key=key, max_results=25000)
        return [(m["step"], m["value"]) for m in points.get("metrics", [])]

    def artifacts(self, mlflow_run_id: str, path: str = "") -> set[str]:
        """Every artifact file's path, walking directories."""
        found, pending = set(), [path]
        while pending:
            directory = pending.pop()
            listing = self.get("artifacts/list", run_id=mlflow_run_id, **({"path": directory} if directory else {}))
            for item in listing.get("files", []):
                (pending.append if item["is_dir"] else found.add)(item["path"])
        return found


def params(run: dict) -> dict:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}
