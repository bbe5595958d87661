"""``[runs]``: run-directory retention in the agent's configuration."""

import pytest

from labrun.agent import ConfigError, load_config


def config(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load_config(path, socket=tmp_path / "s", state_dir=tmp_path)


def test_default_keeps_run_directories(tmp_path):
    runs = load_config(None, socket=tmp_path / "s", state_dir=tmp_path).runs
    assert runs.retention_days is None and runs.purge is False and runs.retention_interval == 3600


def test_retention_and_purge(tmp_path):
    runs = config(tmp_path, "[runs]\nretention_days = 14\npurge = true\n").runs
    assert runs.retention_days == 14.0 and runs.purge is True


@pytest.mark.parametrize("value, seconds", [('"10m"', 600), ('"1h"', 3600), ('"1h30m"', 5400), ("90", 90),
                                            ('"2d"', 172800)])
def test_retention_interval_takes_durations(tmp_path, value, seconds):
    runs = config(tmp_path, f"[runs]\nretention_days = 1\nretention_interval = {value}\n").runs
    assert runs.retention_interval == seconds


@pytest.mark.parametrize("text, message", [
    ("[runs]\nretention_days = 0\n", "runs.retention_days: must be more than 0"),
    ("[runs]\nretention_days = \"2w\"\n", "runs.retention_days"),
    ("[runs]\npurge = 1\n", "runs.purge"),
    ("[runs]\nkeep = 3\n", "keep"),
    ("[runs]\nretention_interval = \"soon\"\n",
     "runs.retention_interval: duration must be seconds or like '1h30m', got 'soon'"),
    ("[runs]\nretention_interval = \"1w\"\n", "runs.retention_interval: .* got '1w'"),
    ("[runs]\nretention_interval = \"0s\"\n", "runs.retention_interval: duration must be positive"),
    ("[runs]\nretention_interval = -60\n", "runs.retention_interval: duration must be positive"),
    ("[runs]\nretention_interval = true\n", "runs.retention_interval: duration must be seconds"),
])
def test_bad_values_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, text)
