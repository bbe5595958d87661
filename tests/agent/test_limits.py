"""The [limits] section and the counters behind it, without sockets."""

import pytest

from labrun.agent._config import ConfigError, load_config
from labrun.agent._limits import Limits, LimitsConfig, check_labels, labels_size
from labrun.protocol import BadRequest, TooLarge, Unavailable


def config_with(tmp_path, text: str):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load_config(path, socket=tmp_path / "s", state_dir=tmp_path / "state")


def test_defaults_and_overrides(tmp_path):
    assert config_with(tmp_path, "").limits == LimitsConfig()
    config = config_with(tmp_path, "[limits]\nconnections_per_user = 3\nidle_timeout_seconds = 1.5\n")
    assert config.limits.connections_per_user == 3 and config.limits.idle_timeout_seconds == 1.5


def test_the_frame_limit_and_the_connection_buffer_are_one(tmp_path):
    assert config_with(tmp_path, "[agent]\nmax_frame_bytes = 1000000\n").limits.buffer_bytes_per_connection == 1000000
    config = config_with(tmp_path, "[limits]\nbuffer_bytes_per_connection = 65536\n")
    assert config.max_frame_bytes == 65536
    assert config.limits.list_page_bytes <= 32768   # a page always fits in a frame


@pytest.mark.parametrize("text, message", [
    ("[limits]\nconnection_per_user = 3\n", "unknown key 'connection_per_user'"),
    ("[limits]\nconnections_per_user = 0\n", "limits.connections_per_user: expected a positive integer"),
    ("[limits]\nconnections_per_user = 2.5\n", "limits.connections_per_user: expected a positive integer"),
    ("[limits]\nidle_timeout_seconds = true\n", "limits.idle_timeout_seconds: expected a positive number"),
    ("[limits]\nlabel_value_chars = 100000\n", "limits.label_value_chars: at most 4096"),
])
def test_bad_limits_are_refused_by_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        config_with(tmp_path, text)


def test_connections_per_user_and_release():
    limits = Limits(LimitsConfig(connections_per_user=2))
    limits.admit(1000, fd=5)
    limits.admit(1000, fd=6)
    with pytest.raises(Unavailable, match="limits.connections_per_user"):
        limits.admit(1000, fd=7)
    limits.admit(1001, fd=7)   # another user is not affected
    limits.release(1000)
    limits.admit(1000, fd=8)


def test_buffered_bytes_per_user_and_in_total():
    limits = Limits(LimitsConfig(buffer_bytes_per_user=100, buffer_bytes_total=150))
    limits.buffer(1, 0, 100)
    with pytest.raises(Unavailable, match="limits.buffer_bytes_per_user"):
        limits.buffer(1, 100, 101)
    limits.buffer(2, 0, 50)
    with pytest.raises(Unavailable, match="limits.buffer_bytes_total"):
        limits.buffer(3, 0, 1)
    limits.buffer(1, 100, 0)   # a frame completed: its bytes are free again
    limits.buffer(3, 0, 100)
    assert limits.buffered_total == 150


def test_requests_in_flight():
    limits = Limits(LimitsConfig(requests_per_connection=2, requests_per_user=3))
    limits.start_request(1, in_flight_here=0)
    limits.start_request(1, in_flight_here=1)
    with pytest.raises(Unavailable, match="limits.requests_per_connection"):
        limits.start_request(1, in_flight_here=2)
    limits.start_request(1, in_flight_here=0)   # a second connection
    with pytest.raises(Unavailable, match="limits.requests_per_user"):
        limits.start_request(1, in_flight_here=0)
    limits.end_request(1)
    limits.start_request(1, in_flight_here=0)


def test_label_sizes():
    config = LimitsConfig(label_key_chars=10, label_value_chars=20, labels_bytes_per_run=100)
    check_labels(config, "spec.tags", {"k": "v" * 20})
    with pytest.raises(BadRequest, match="limits.label_key_chars"):
        check_labels(config, "spec.tags", {"k" * 11: "v"})
    with pytest.raises(BadRequest, match="limits.label_value_chars") as info:
        check_labels(config, "spec.tags", {"k": "v" * 21})
    assert info.value.details["field"] == "spec.tags.k"
    with pytest.raises(TooLarge, match="limits.labels_bytes_per_run"):
        check_labels(config, "spec.tags", {f"k{i}": "v" * 15 for i in range(6)})
    with pytest.raises(TooLarge):
        check_labels(config, "spec.tags", {"k": "v" * 20}, others=80)
    assert labels_size({"é": "ab", "k": None}) == 5
