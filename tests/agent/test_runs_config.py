"""``[runs]``: run-directory retention in the agent's configuration."""

import pytest

from labrun.agent import ConfigError, load_config


def config(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load_config(path, socket=tmp_path / "s", state_dir=tmp_path)


def test_default_keeps_run_directories(tmp_path):
    runs = load_config(None, socket=tmp_path / "s", state_dir=tmp_path).runs
    assert runs.retention_days is None and runs.purge is False


def test_retention_and_purge(tmp_path):
    runs = config(tmp_path, "[runs]\nretention_days = 14\npurge = true\n").runs
    assert runs.retention_days == 14.0 and runs.purge is True


@pytest.mark.parametrize("text, message", [
    ("[runs]\nretention_days = 0\n", "runs.retention_days: must be more than 0"),
    ("[runs]\nretention_days = \"2w\"\n", "runs.retention_days"),
    ("[runs]\npurge = 1\n", "runs.purge"),
    ("[runs]\nkeep = 3\n", "keep"),
])
def test_bad_values_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, text)
