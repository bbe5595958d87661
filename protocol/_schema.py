"""Validation of every request's arguments, and of the run spec a submit carries.

Validators are plain functions ``(value, path) -> value`` that raise ``BadRequest``
naming the offending field by its path (``spec.resources.cpus``). Combinators
build the per-op schemas in ``OP_SCHEMAS``. Unknown fields are refused, so a typo
is an error rather than a silently ignored option.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from ._constants import EXPERIMENT_NAME_RE, MAX_DURATION_SECONDS_DEFAULT
from ._content_hash import FORMS as CONTENT_HASHES, SHA256
from ._errors import BadRequest
from ._limits import DESCRIPTION_MAX, DISPLAY_NAME_MAX, LABEL_KEY_MAX, LABEL_VALUE_MAX
from ._manifest import check_hash, validate_manifest
from ._statuses import CANCELED, COMPLETED, FAILED, STATUSES

Validator = Callable[[Any, str], Any]
_MISSING = object()

RUN_ID_RE = re.compile(r"^[\w\-.]{1,300}$")
# Integers are stored in SQLite and handed to the kernel: anything outside a signed 64-bit integer is refused.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _type_name(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


def _fail(path: str, expected: str, value: Any) -> BadRequest:
    return BadRequest(f"{path}: expected {expected}, got {_type_name(value)}", details={"field": path})


def string(*, min_len: int = 0, max_len: int = 1 << 20, pattern: re.Pattern | None = None, what: str = "",
           nul: bool = True) -> Validator:
    """A string of ``min_len`` to ``max_len`` characters; ``nul=False`` refuses NUL (paths, argv, environment)."""
    def check(value, path):
        if not isinstance(value, str):
            raise _fail(path, "a string", value)
        if not min_len <= len(value) <= max_len:
            raise BadRequest(f"{path}: length must be between {min_len} and {max_len}", details={"field": path})
        if not nul and "\0" in value:
            error = BadRequest(f"{path}: must not contain a NUL character", details={"field": path})
            error.nul = True   # one_of reports this rather than a type mismatch
            raise error
        if pattern is not None and not pattern.match(value):
            raise BadRequest(f"{path}: {what or 'invalid value'}: {value[:80]!r}", details={"field": path})
        return value

    return check


def integer(*, min: int = INT64_MIN, max: int = INT64_MAX) -> Validator:
    def check(value, path):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, "an integer", value)
        if not min <= value <= max:
            bounds = f"at least {min}" if max == INT64_MAX else f"between {min} and {max}"
            raise BadRequest(f"{path}: must be {bounds}, got {value}", details={"field": path})
        return value

    return check


def number(*, min: float | None = None) -> Validator:
    """A finite int or float (NaN and infinities are refused), within a signed 64-bit integer's range."""
    def check(value, path):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, "a number", value)
        if isinstance(value, float) and not math.isfinite(value):
            raise BadRequest(f"{path}: must be a finite number, got {value}", details={"field": path})
        if not INT64_MIN <= value <= INT64_MAX:
            raise BadRequest(f"{path}: out of range, got {value}", details={"field": path})
        if min is not None and value < min:
            raise BadRequest(f"{path}: must be at least {min}, got {value}", details={"field": path})
        return value

    return check


def boolean(value, path):
    if not isinstance(value, bool):
        raise _fail(path, "a boolean", value)
    return value


def binary(value, path):
    if not isinstance(value, (bytes, bytearray)):
        raise _fail(path, "binary data", value)
    return bytes(value)


def anything(value, path):
    return value


def enum(values) -> Validator:
    allowed = tuple(values)

    def check(value, path):
        if value not in allowed:
            raise BadRequest(f"{path}: must be one of {', '.join(map(str, allowed))}; got {value!r}",
                             details={"field": path})
        return value

    return check


def nullable(inner: Validator) -> Validator:
    return lambda value, path: None if value is None else inner(value, path)


def list_of(inner: Validator, *, min_items: int = 0, max_items: int = 100_000) -> Validator:
    def check(value, path):
        if not isinstance(value, (list, tuple)):
            raise _fail(path, "a list", value)
        if not min_items <= len(value) <= max_items:
            raise BadRequest(f"{path}: must have between {min_items} and {max_items} items", details={"field": path})
        return [inner(item, f"{path}[{i}]") for i, item in enumerate(value)]

    return check


def map_of(inner: Validator, *, max_items: int = 100_000, key: Validator | None = None) -> Validator:
    def check(value, path):
        if not isinstance(value, dict):
            raise _fail(path, "a map", value)
        if len(value) > max_items:
            raise BadRequest(f"{path}: at most {max_items} entries", details={"field": path})
        out = {}
        for key_, item in value.items():
            if not isinstance(key_, str):
                raise _fail(f"{path} key", "a string", key_)
            if key is not None:
                key(key_, f"{path} key {key_[:80]!r}")
            out[key_] = inner(item, f"{path}.{key_}")
        return out

    return check


def one_of(*options: tuple[str, Validator]) -> Validator:
    """Accept the first option whose validator passes; the error lists all of them."""

    def check(value, path):
        errors = []
        for _name, validator in options:
            try:
                return validator(value, path)
            except BadRequest as exc:
                errors.append(exc)
        # A NUL inside an option of the right type says more than "expected X or Y".
        for exc in errors:
            if getattr(exc, "nul", False):
                raise exc
        expected = " or ".join(name for name, _ in options)
        raise _fail(path, expected, value)

    return check


class Field:
    __slots__ = ("validator", "default")

    def __init__(self, validator: Validator, default: Any = _MISSING):
        self.validator = validator
        self.default = default

    @property
    def required(self) -> bool:
        return self.default is _MISSING


def struct(fields: dict[str, Field]) -> Validator:
    """A map with known keys: missing required keys, unknown keys and bad values are errors."""

    def check(value, path):
        if not isinstance(value, dict):
            raise _fail(path, "a map", value)
        unknown = sorted(k for k in value if k not in fields)
        if unknown:
            raise BadRequest(f"{path}: unknown field {unknown[0]!r}", details={"field": f"{path}.{unknown[0]}"})
        out = {}
        for name, field in fields.items():
            where = f"{path}.{name}"
            if name not in value or (value[name] is None and not field.required and field.default is not None):
                if field.required:
                    raise BadRequest(f"{where}: missing required field", details={"field": where})
                default = field.default
                out[name] = default() if callable(default) else default
            else:
                out[name] = field.validator(value[name], where)
        return out

    return check


def _relative_path(value, path):
    string(min_len=1, max_len=4096, nul=False)(value, path)
    parts = value.replace("\\", "/").split("/")
    if value.startswith("/") or ".." in parts:
        raise BadRequest(f"{path}: must be a path inside the source directory, got {value!r}", details={"field": path})
    return value


RESOURCES = struct({
    "cpus": Field(integer(min=1, max=4096), 1),
    "memory": Field(nullable(integer(min=1)), None),
    "gpus": Field(integer(min=0, max=64), 0),
})

def _absolute_path(value, path):
    string(min_len=1, max_len=4096)(value, path)
    if not value.startswith("/") or "\x00" in value:
        raise BadRequest(f"{path}: must be an absolute path, got {value[:80]!r}", details={"field": path})
    return value


SNAPSHOT = struct({
    # A manifest of content hashes (see _manifest.py), or a directory the run works in itself.
    "files": Field(nullable(validate_manifest), None),
    "in_place": Field(nullable(_absolute_path), None),
})

BLOB = struct({
    "hash": Field(check_hash),
    "size": Field(integer(min=0)),
    "offset": Field(integer(min=0), 0),
    "data": Field(binary),
})

SUBMIT_CONTENT = struct({"hash": Field(check_hash), "data": Field(binary)})

_ENV_KEY_RE = re.compile(r"^[^=\0]+$")
# execve takes "KEY=value" strings: a key with '=' or NUL, or a value with NUL, cannot be passed to a run.
_ENV = map_of(string(max_len=1 << 17, nul=False), max_items=10_000,
              key=string(min_len=1, max_len=4096, pattern=_ENV_KEY_RE,
                         what="an environment variable name must be non-empty and contain no '=' or NUL"))
_LABELS = map_of(string(max_len=LABEL_VALUE_MAX), max_items=1000, key=string(min_len=1, max_len=LABEL_KEY_MAX))
_NAME = string(min_len=1, max_len=255)
_ARG = string(max_len=1 << 17, nul=False)

ENVIRONMENT = struct({
    "name": Field(_NAME),
    "version": Field(nullable(integer(min=1)), None),
    "environment_variables": Field(_ENV, dict),
    "python": Field(struct({
        "user_managed_dependencies": Field(boolean, False),
        "interpreter_path": Field(nullable(string(min_len=1, max_len=4096, nul=False)), None),
        "pip_requirements": Field(nullable(list_of(string(max_len=4096), max_items=10_000)), None),
        "conda_specification": Field(nullable(string(max_len=1 << 20)), None),
    }), lambda: {"user_managed_dependencies": False, "interpreter_path": None, "pip_requirements": None,
                 "conda_specification": None}),
    "docker": Field(struct({"base_image": Field(nullable(string(min_len=1, max_len=1024)), None)}),
                    lambda: {"base_image": None}),
})

DISTRIBUTED = struct({
    "kind": Field(enum(("pytorch", "mpi", "tensorflow"))),
    "node_count": Field(integer(min=1), 1),
    "process_count": Field(nullable(integer(min=1, max=1024)), None),
    "backend": Field(nullable(enum(("nccl", "gloo"))), None),
    "process_count_per_node": Field(nullable(integer(min=1, max=1024)), None),
    "worker_count": Field(nullable(integer(min=1, max=1024)), None),
    "parameter_server_count": Field(nullable(integer(min=0, max=1024)), None),
})

RESUME_FROM = struct({
    "path": Field(string(min_len=1, max_len=4096)),
    "run_id": Field(nullable(string(min_len=1, max_len=300)), None),
})

DOCKER = struct({
    "use_docker": Field(boolean, False),
    "shm_size": Field(nullable(string(min_len=1, max_len=32)), None),
    "shared_volumes": Field(boolean, True),
    "arguments": Field(list_of(string(max_len=4096), max_items=100), list),
})

RUN_SPEC = struct({
    "experiment": Field(string(pattern=EXPERIMENT_NAME_RE, what=(
        "experiment name must be 1 to 255 characters, start with a letter or digit, and contain only "
        "letters, digits, hyphens and underscores"))),
    "display_name": Field(nullable(string(max_len=DISPLAY_NAME_MAX)), None),
    "script": Field(nullable(_relative_path), None),
    "arguments": Field(list_of(_ARG, max_items=10_000), list),
    "command": Field(nullable(one_of(
        ("a non-empty list of strings", list_of(_ARG, min_items=1, max_items=10_000)),
        ("a non-empty string", string(min_len=1, max_len=1 << 17, nul=False)),
    )), None),
    "interpreter": Field(nullable(string(min_len=1, max_len=4096, nul=False)), None),
    "snapshot": Field(SNAPSHOT),
    "environ": Field(_ENV, dict),
    "environment_variables": Field(_ENV, dict),
    "max_run_duration_seconds": Field(integer(min=1), MAX_DURATION_SECONDS_DEFAULT),
    "tags": Field(_LABELS, dict),
    "properties": Field(_LABELS, dict),
    "resources": Field(RESOURCES, lambda: {"cpus": 1, "memory": None, "gpus": 0}),
    "priority": Field(integer(min=-1_000_000, max=1_000_000), 0),
    "compute_target": Field(string(min_len=1, max_len=255), "local"),
    "environment": Field(nullable(ENVIRONMENT), None),
    "distributed": Field(nullable(DISTRIBUTED), None),
    "resume_from": Field(nullable(RESUME_FROM), None),
    "docker": Field(nullable(DOCKER), None),
    # Azure ML's run hierarchy, and its runDefinition as the client built it (shown back by get_details).
    "parent_run_id": Field(nullable(string(pattern=RUN_ID_RE, what="not a run id")), None),
    "description": Field(nullable(string(max_len=1 << 14)), None),
    "run_definition": Field(nullable(map_of(anything, max_items=100)), None),
    # Dependencies (labrun's own, after Slurm's --dependency): start once these runs (or arrays) have ended
    # whatever their outcome (``after``), or only if they all Completed (``afterok``).
    "after": Field(list_of(string(pattern=RUN_ID_RE, what="not a run id"), max_items=1000), list),
    "afterok": Field(list_of(string(pattern=RUN_ID_RE, what="not a run id"), max_items=1000), list),
})

_RUN_ID = string(pattern=RUN_ID_RE, what="not a run id")

# ``labrun submit --array 1-20%4``: one run per index, at most ``throttle`` running at once (0: no limit).
MAX_ARRAY_SIZE = 10_000
ARRAY = struct({
    "indices": Field(list_of(integer(min=0, max=4_000_000), min_items=1, max_items=MAX_ARRAY_SIZE)),
    "throttle": Field(integer(min=0, max=MAX_ARRAY_SIZE), 0),
})
_FINISHED = (COMPLETED, FAILED, CANCELED)

OP_SCHEMAS: dict[str, Validator] = {
    "hello": struct({"protocol": Field(integer(min=0)), "client": Field(nullable(string(max_len=200)), None)}),
    "submit": struct({
        "spec": Field(lambda value, path: validate_run_spec(value, path)),
        "array": Field(nullable(ARRAY), None),
        # The client's idempotency key: the same key from the same user returns the run it already made.
        "idempotency_key": Field(nullable(string(min_len=1, max_len=128, nul=False)), None),
        # Small contents of the snapshot's files, sent with the submit that names them (each by its SHA-256), so that
        # a new tree of small files needs no upload first; agents that take them say so in their hello.
        "contents": Field(list_of(SUBMIT_CONTENT, max_items=100_000), list),
    }),
    # ``content_hash``: the form of the hashes in the request (``_content_hash``); older clients send none.
    "blob_put": struct({"blobs": Field(list_of(BLOB, min_items=1, max_items=100_000)),
                        "content_hash": Field(enum(CONTENT_HASHES), SHA256)}),
    # Contents as open files passed with the frame's first bytes (SCM_RIGHTS, at most MAX_FDS_PER_MESSAGE with each
    # byte): ``count`` of them, in order; the agent copies and hashes each, and answers their hashes and sizes.
    "blob_fds": struct({"count": Field(integer(min=1, max=1_000_000)),
                        "content_hash": Field(enum(CONTENT_HASHES), SHA256)}),
    "get": struct({"run_id": Field(_RUN_ID)}),
    "list": struct({
        "all": Field(boolean, False),
        "experiment": Field(nullable(string(max_len=255)), None),
        "status": Field(nullable(list_of(enum(STATUSES), max_items=len(STATUSES))), None),
        "limit": Field(nullable(integer(min=1, max=10_000)), None),
        "before": Field(nullable(integer(min=1)), None),
        "parent": Field(nullable(_RUN_ID), None),
        "array": Field(nullable(_RUN_ID), None),
    }),
    "cancel": struct({"run_id": Field(_RUN_ID)}),
    "remove": struct({"run_id": Field(_RUN_ID), "purge": Field(boolean, False)}),
    "clean": struct({
        "older_than": Field(nullable(number(min=0)), None),
        "status": Field(nullable(list_of(enum(_FINISHED), min_items=1, max_items=3)), None),
        "all_users": Field(boolean, False),
        "purge": Field(boolean, False),
    }),
    "wait": struct({"run_id": Field(_RUN_ID), "timeout": Field(nullable(number(min=0)), None)}),
    "logs": struct({
        "run_id": Field(_RUN_ID),
        "offset": Field(integer(min=0), 0),
        "follow": Field(boolean, False),
        "name": Field(_relative_path, "std_log.txt"),
    }),
    "status": struct({}),
    "drain": struct({"wait": Field(boolean, True), "timeout": Field(nullable(number(min=0)), None)}),
    "resume": struct({}),
    "log_metrics": struct({
        "run_id": Field(_RUN_ID),
        "token": Field(nullable(string(max_len=200)), None),
        "metrics": Field(list_of(struct({
            "name": Field(_NAME),
            "kind": Field(enum(("scalar", "list", "row", "table", "image"))),
            "value": Field(anything),
            "step": Field(nullable(integer()), None),
            "time": Field(number()),
            "description": Field(nullable(string(max_len=DESCRIPTION_MAX)), None),
        }), max_items=100_000)),
    }),
    "get_metrics": struct({"run_id": Field(_RUN_ID), "name": Field(nullable(_NAME), None)}),
    "set_labels": struct({
        "run_id": Field(_RUN_ID),
        "token": Field(nullable(string(max_len=200)), None),
        "kind": Field(enum(("tags", "properties", "error", "attributes"))),
        # An error's text may be long; tags and properties are held to the agent's [limits] by the agent.
        "values": Field(map_of(nullable(string(max_len=1 << 16)), max_items=1000,
                               key=string(min_len=1, max_len=LABEL_KEY_MAX))),
    }),
    # area: None (outputs, logs and uploads), "logs" (only user_logs/), "snapshot" (the source the run was submitted with).
    "files": struct({"run_id": Field(_RUN_ID), "area": Field(nullable(enum(("logs", "snapshot"))), None)}),
    "download": struct({"run_id": Field(_RUN_ID), "name": Field(_relative_path), "offset": Field(integer(min=0), 0),
                        "area": Field(nullable(enum(("snapshot",))), None)}),
    "put_file": struct({
        "run_id": Field(_RUN_ID),
        "token": Field(nullable(string(max_len=200)), None),
        "name": Field(_relative_path),
        "data": Field(binary),
        "append": Field(boolean, False),
    }),
    "env_register": struct({"environment": Field(ENVIRONMENT)}),
    "env_get": struct({"name": Field(_NAME), "version": Field(nullable(integer(min=1)), None)}),
    # A page of environments by name, after ``after``; the client follows pages until one is empty.
    "env_list": struct({"after": Field(nullable(_NAME), None), "limit": Field(nullable(integer(min=1, max=1000)), None)}),
    # Interactive runs (start_logging, child_run): created Running, ended by the client, bound to its connection.
    "start_run": struct({
        "experiment": Field(string(pattern=EXPERIMENT_NAME_RE, what="not an experiment name")),
        "run_id": Field(nullable(_RUN_ID), None),
        "display_name": Field(nullable(string(max_len=1024)), None),
        "description": Field(nullable(string(max_len=1 << 14)), None),
        "tags": Field(_LABELS, dict),
        "properties": Field(_LABELS, dict),
        "parent_run_id": Field(nullable(_RUN_ID), None),
        # start_logging(snapshot_directory=...): a manifest, as a submit's, with the same uploads.
        "snapshot": Field(nullable(struct({"files": Field(validate_manifest)})),
                          None),
    }),
    "finish": struct({
        "run_id": Field(_RUN_ID),
        "token": Field(nullable(string(max_len=200)), None),
        "status": Field(enum(("Completed", "Failed", "Canceled"))),
        "error": Field(nullable(string(max_len=1 << 16)), None),
        "error_code": Field(nullable(string(max_len=200)), None),
    }),
    # A page of experiments by name, after ``after`` (or the one named ``name``); follow until a page is empty.
    "experiments": struct({"after": Field(nullable(_NAME), None), "limit": Field(nullable(integer(min=1, max=1000)), None),
                           "name": Field(nullable(_NAME), None)}),
    "experiment_update": struct({
        "name": Field(string(pattern=EXPERIMENT_NAME_RE, what="not an experiment name")),
        "tags": Field(nullable(map_of(nullable(string(max_len=4096)), max_items=1000)), None),
        "remove_tags": Field(nullable(list_of(string(max_len=4096), max_items=1000)), None),
        "archived": Field(nullable(boolean), None),
    }),
    "ui": struct({"start": Field(boolean, True), "timeout": Field(number(min=0), 120.0)}),
    "watch": struct({
        "since": Field(nullable(integer(min=0)), None),
        "run_id": Field(nullable(_RUN_ID), None),
        "experiment": Field(nullable(string(max_len=255)), None),
        "user": Field(nullable(string(max_len=255)), None),
        "types": Field(nullable(list_of(string(max_len=100), max_items=100)), None),
        "follow": Field(boolean, True),
    }),
}


def validate_run_spec(spec: Any, path: str = "spec") -> dict:
    """Validate a run spec and its cross-field rules; return it with defaults filled in."""
    spec = RUN_SPEC(spec, path)
    if spec["command"] is not None and spec["script"] is not None:
        raise BadRequest(f"{path}: set either 'command' or 'script' (with 'arguments'), not both",
                         details={"field": f"{path}.command"})
    if spec["command"] is None and spec["script"] is None:
        raise BadRequest(f"{path}: a run needs a 'command' or a 'script'", details={"field": f"{path}.command"})
    if spec["command"] is not None and spec["arguments"]:
        raise BadRequest(f"{path}: 'arguments' go with 'script'; put them in the 'command' instead",
                         details={"field": f"{path}.arguments"})
    snapshot = spec["snapshot"]
    if (snapshot["files"] is None) == (snapshot["in_place"] is None):
        raise BadRequest(f"{path}.snapshot: give exactly one of 'files' or 'in_place'",
                         details={"field": f"{path}.snapshot"})
    return spec
