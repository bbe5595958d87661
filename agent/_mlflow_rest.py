"""MLflow's tracking REST API (``/api/2.0/mlflow/...``) and its artifact proxy, over httpx.

The agent never imports ``mlflow``: this is the whole of what it needs from a tracking server.
Errors are translated once, here:

- ``Unavailable``: the server did not answer, or answered 408, 429 or 5xx: try again later;
- ``Refused``: any other answer that is not a success, with MLflow's ``error_code``
  (``RESOURCE_DOES_NOT_EXIST``, ``RESOURCE_ALREADY_EXISTS``, ``INVALID_PARAMETER_VALUE``...).
"""

from __future__ import annotations

from typing import AsyncIterator
from urllib.parse import quote

API = "/api/2.0/mlflow/"
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts/"


class MlflowError(Exception):
    pass


class Unavailable(MlflowError):
    """The server is down, slow or overloaded: nothing was refused, try again."""


class Refused(MlflowError):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code


class MlflowRest:
    def __init__(self, client, tracking_uri: str):   # an httpx.AsyncClient (imported only when mirroring)
        self.client = client
        self.base = tracking_uri.rstrip("/")

    async def _request(self, method: str, url: str, **kwargs) -> dict:
        import httpx

        try:
            response = await self.client.request(method, url, **kwargs)
        except (httpx.HTTPError, OSError) as exc:
            raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
        if response.is_success:
            try:
                return response.json() if response.content else {}
            except ValueError:
                return {}
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise Unavailable(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            body = response.json()
        except ValueError:
            body = {}
        raise Refused(response.status_code, body.get("error_code", ""), body.get("message") or response.text[:200])

    async def call(self, method: str, endpoint: str, body: dict | None = None) -> dict:
        if method == "GET":
            return await self._request("GET", self.base + API + endpoint, params=body)
        return await self._request(method, self.base + API + endpoint, json=body or {})

    # -- experiments -------------------------------------------------------------------

    async def experiment_id(self, name: str) -> str:
        """The id of the experiment called ``name``, created (or restored from MLflow's trash) if need be."""
        try:
            found = (await self.call("GET", "experiments/get-by-name", {"experiment_name": name}))["experiment"]
        except Refused as exc:
            if exc.code != "RESOURCE_DOES_NOT_EXIST":
                raise
        else:
            if found.get("lifecycle_stage") == "deleted":
                await self.call("POST", "experiments/restore", {"experiment_id": found["experiment_id"]})
            return found["experiment_id"]
        try:
            return (await self.call("POST", "experiments/create", {"name": name}))["experiment_id"]
        except Refused as exc:
            if exc.code != "RESOURCE_ALREADY_EXISTS":   # someone else created it meanwhile
                raise
            return (await self.call("GET", "experiments/get-by-name", {"experiment_name": name}))["experiment"][
                "experiment_id"]

    # -- runs --------------------------------------------------------------------------

    async def create_run(self, experiment_id: str, *, user: str, start_ms: int, run_name: str,
                         tags: dict[str, str]) -> dict:
        body = {"experiment_id": experiment_id, "user_id": user, "start_time": start_ms, "run_name": run_name,
                "tags": [{"key": k, "value": v} for k, v in tags.items()]}
        return (await self.call("POST", "runs/create", body))["run"]["info"]

    async def get_run(self, run_id: str) -> dict:
        return (await self.call("GET", "runs/get", {"run_id": run_id}))["run"]

    async def update_run(self, run_id: str, status: str, end_ms: int | None = None) -> None:
        body = {"run_id": run_id, "status": status}
        if end_ms is not None:
            body["end_time"] = end_ms
        await self.call("POST", "runs/update", body)

    async def restore_run(self, run_id: str) -> None:
        await self.call("POST", "runs/restore", {"run_id": run_id})

    async def log_batch(self, run_id: str, *, metrics=(), params=(), tags=()) -> None:
        body = {"run_id": run_id, "metrics": list(metrics), "params": list(params), "tags": list(tags)}
        await self.call("POST", "runs/log-batch", body)

    # -- artifacts ---------------------------------------------------------------------

    def artifact_url(self, artifact_uri: str) -> str | None:
        """Where the server's artifact proxy takes a run's files, or None if it does not proxy them.

        ``mlflow-artifacts:/1/<run>/artifacts`` (``mlflow server``'s default, ``--serve-artifacts``)
        and the equivalent ``http(s)://.../mlflow-artifacts/artifacts/...`` are uploaded through the
        server. A run whose artifacts live elsewhere (``s3://``, a path on the server's machine)
        would need that store's credentials in the agent: those are not uploaded.
        """
        if artifact_uri.startswith("mlflow-artifacts:"):
            path = artifact_uri[len("mlflow-artifacts:"):]
            if path.startswith("//"):   # mlflow-artifacts://host:port/path
                path = "/" + path[2:].partition("/")[2]
            return self.base + ARTIFACTS_API + path.lstrip("/")
        if artifact_uri.startswith(("http://", "https://")) and ARTIFACTS_API in artifact_uri:
            return artifact_uri
        return None

    async def upload(self, url: str, name: str, size: int, chunks: AsyncIterator[bytes]) -> None:
        await self._request("PUT", f"{url.rstrip('/')}/{quote(name)}", content=chunks,
                            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})
