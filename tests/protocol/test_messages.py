"""Request validation: every bad field is named; nothing but BadRequest escapes."""

import pytest
from hypothesis import given, settings, strategies as st

from labrun.protocol import OP_SCHEMAS, AgentError, BadRequest, parse_request, validate_run_spec

SPEC = {"experiment": "exp", "command": ["true"], "snapshot": {"files": []}}


def test_minimal_submit_gets_defaults():
    request = parse_request({"id": 1, "op": "submit", "args": {"spec": SPEC}})
    spec = request.args["spec"]
    assert spec["max_run_duration_seconds"] == 2592000
    assert spec["resources"] == {"cpus": 1, "memory": None, "gpus": 0}
    assert spec["arguments"] == [] and spec["compute_target"] == "local"


@pytest.mark.parametrize("message, field, text", [
    ({"op": "get", "args": {}}, "id", "'id' must be an integer"),
    ({"id": 1, "op": 5}, "op", "'op' must be a string"),
    ({"id": 1, "op": "launch"}, "op", "unknown op 'launch'"),
    ({"id": 1, "op": "get", "args": {}}, "args.run_id", "missing required field"),
    ({"id": 1, "op": "get", "args": {"run_id": 3}}, "args.run_id", "expected a string, got int"),
    ({"id": 1, "op": "get", "args": {"run_id": "x", "colour": 1}}, "args.colour", "unknown field 'colour'"),
    ({"id": 1, "op": "logs", "args": {"run_id": "x", "offset": -1}}, "args.offset", "at least 0"),
    ({"id": 1, "op": "logs", "args": {"run_id": "x", "name": "../../etc/passwd"}}, "args.name", "inside"),
    ({"id": 1, "op": "list", "args": {"status": ["Sleeping"]}}, "args.status[0]", "must be one of"),
    ({"id": 1, "op": "get", "args": {"run_id": "x"}, "extra": 1}, "extra", "unknown envelope field"),
])
def test_bad_requests_name_the_field(message, field, text):
    with pytest.raises(BadRequest, match=text) as info:
        parse_request(message)
    assert info.value.details["field"] == field


@pytest.mark.parametrize("change, text", [
    ({"script": "train.py"}, "not both"),
    ({"command": None}, "needs a 'command' or a 'script'"),
    ({"command": []}, "non-empty list of strings or a non-empty string"),
    ({"command": ["a", 1]}, "spec.command"),
    ({"arguments": ["--x"]}, "'arguments' go with 'script'"),
    ({"experiment": "bad name"}, "experiment name must be"),
    ({"snapshot": {}}, "exactly one of 'files' or 'in_place'"),
    ({"resources": {"cpus": 0}}, "spec.resources.cpus: must be between 1"),
    ({"max_run_duration_seconds": 0}, "at least 1"),
    ({"script": "/etc/passwd", "command": None}, "inside the source directory"),
    ({"environ": {"A": 1}}, "spec.environ.A: expected a string"),
])
def test_run_spec_rules(change, text):
    with pytest.raises(BadRequest, match=text):
        validate_run_spec({**SPEC, **change})


def test_error_roundtrip_keeps_code_and_details():
    error = AgentError.from_wire(BadRequest("x: bad", details={"field": "x"}).to_wire())
    assert isinstance(error, BadRequest) and error.code == "bad_request" and error.details == {"field": "x"}
    assert AgentError.from_wire({"code": "weird", "message": "m"}).code == "internal"


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12) | st.binary(max_size=8) | st.floats(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=500)
@given(st.fixed_dictionaries({}, optional={"id": _values, "op": st.sampled_from(sorted(OP_SCHEMAS)) | _values,
                                           "args": st.dictionaries(st.sampled_from(
                                               ["spec", "run_id", "offset", "follow", "protocol", "all", "data",
                                                "blob_put", "timeout", "status", "name", "x"]), _values, max_size=4)}))
def test_random_requests_raise_only_bad_request(message):
    try:
        parse_request(message)
    except BadRequest:
        pass
