"""Values that used to get past validation and fail deep in the agent: every one is a BadRequest naming its field."""

import math

import pytest

from labrun.protocol import BadRequest, parse_request

SPEC = {"experiment": "exp", "command": ["true"], "snapshot": {"files": []}}


def submit(**changes):
    return {"id": 1, "op": "submit", "args": {"spec": {**SPEC, **changes}}}


@pytest.mark.parametrize("message, field", [
    # Beyond a signed 64-bit integer: SQLite and the kernel cannot hold them.
    (submit(max_run_duration_seconds=2**63), "args.spec.max_run_duration_seconds"),
    (submit(priority=2**64 - 1), "args.spec.priority"),
    (submit(resources={"memory": 2**63}), "args.spec.resources.memory"),
    ({"id": 1, "op": "logs", "args": {"run_id": "x", "offset": 2**63}}, "args.offset"),
    ({"id": 1, "op": "list", "args": {"before": 2**63}}, "args.before"),
    ({"id": 1, "op": "download", "args": {"run_id": "x", "name": "a", "offset": 2**64 - 1}}, "args.offset"),
    # Negative where only positive makes sense.
    (submit(max_run_duration_seconds=-1), "args.spec.max_run_duration_seconds"),
    (submit(resources={"memory": -5}), "args.spec.resources.memory"),
    ({"id": 1, "op": "wait", "args": {"run_id": "x", "timeout": -0.5}}, "args.timeout"),
    # NaN and infinities in numeric fields.
    ({"id": 1, "op": "wait", "args": {"run_id": "x", "timeout": math.nan}}, "args.timeout"),
    ({"id": 1, "op": "wait", "args": {"run_id": "x", "timeout": math.inf}}, "args.timeout"),
    ({"id": 1, "op": "log_metrics", "args": {"run_id": "x", "metrics": [
        {"name": "m", "kind": "scalar", "value": 1, "time": math.nan}]}}, "args.metrics[0].time"),
    ({"id": 1, "op": "log_metrics", "args": {"run_id": "x", "metrics": [
        {"name": "m", "kind": "scalar", "value": 1, "time": 1.0, "step": 2**63}]}}, "args.metrics[0].step"),
    # Environment variables execve cannot pass.
    (submit(environment_variables={"A=B": "x"}), "args.spec.environment_variables key 'A=B'"),
    (submit(environment_variables={"A\0B": "x"}), "args.spec.environment_variables key 'A\\x00B'"),
    (submit(environment_variables={"": "x"}), "args.spec.environment_variables key ''"),
    (submit(environ={"PATH": "/bin\0/sbin"}), "args.spec.environ.PATH"),
    # NUL in argv and paths.
    (submit(command=None, script="a\0b.py"), "args.spec.script"),
    (submit(command="echo a\0b"), "args.spec.command"),
    ({"id": 1, "op": "download", "args": {"run_id": "x", "name": "outputs/a\0b"}}, "args.name"),
    # Label keys and values over the protocol's bounds.
    (submit(tags={"k" * 256: "v"}), "args.spec.tags key '" + "k" * 80 + "'"),
    (submit(tags={"k": "v" * 4097}), "args.spec.tags.k"),
    (submit(display_name="d" * 1025), "args.spec.display_name"),
    # A file named outputs where the run's outputs/ directory goes.
    (submit(snapshot={"files": [["outputs", 1, 0o644, "0" * 64]]}), "args.spec.snapshot.files"),
])
def test_refused_with_the_field_named(message, field):
    with pytest.raises(BadRequest) as info:
        parse_request(message)
    assert info.value.details["field"] == field
    assert info.value.code == "bad_request"


@pytest.mark.parametrize("value", [2**63 - 1, -(2**63) + 1, 0])
def test_int64_edges_inside_are_accepted(value):
    parse_request({"id": 1, "op": "log_metrics", "args": {"run_id": "x", "metrics": [
        {"name": "m", "kind": "scalar", "value": 1, "time": 1.0, "step": value}]}})


def test_nul_free_environment_passes():
    request = parse_request(submit(environment_variables={"A": "b=c", "PATH": "/bin"}))
    assert request.args["spec"]["environment_variables"] == {"A": "b=c", "PATH": "/bin"}
