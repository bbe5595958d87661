import pytest

from labrun.agent import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path):
    config = load_config(None, socket=tmp_path / "s", state_dir=tmp_path / "st")
    assert config.stop_grace_seconds == 10 and config.resources.cpus is None and config.targets == {}


def test_full_file(tmp_path):
    config = load_config(write(tmp_path, """
[agent]
stop_grace_seconds = 2
[resources]
cpus = 2
memory = "8G"
gpus = ["0", 1]
max_concurrent_runs = 3
[targets.MyCluster]
kind = "local"
cpus = 2
"""))
    assert config.resources.memory == 8 << 30 and config.resources.gpus == ["0", "1"]
    assert config.targets["MyCluster"].cpus == 2 and config.stop_grace_seconds == 2


@pytest.mark.parametrize("text, message", [
    ("[resources]\ncpu = 2", "unknown key 'cpu'"),
    ("[resources]\ncpus = 'two'", "resources.cpus: expected int"),
    ("[resources]\nmemory = 'lots'", "resources.memory"),
    ("[targets.X]\nkind = 'k8s'", "targets.X.kind"),
    ("[agnet]\n", "unknown key 'agnet'"),
    ("not toml [", "config file"),
])
def test_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
