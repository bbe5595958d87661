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
    ("[snapshot]\nmax_file = 10", "unknown key 'max_file'"),
    ("[snapshot]\nmax_files = 0", "snapshot.max_files: must be at least 1"),
    ("[snapshot]\nmax_files = '10'", "snapshot.max_files: expected int"),
    ("[snapshot]\nmax_bytes = 'huge'", "snapshot.max_bytes"),
])
def test_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_snapshot_limits(tmp_path):
    default = load_config(None, socket=tmp_path / "s", state_dir=tmp_path / "st").snapshot
    assert (default.max_files, default.max_bytes) == (2000, 300 << 20)   # Azure ML's
    config = load_config(write(tmp_path, "[snapshot]\nmax_files = 100000\nmax_bytes = '20G'\n"))
    assert (config.snapshot.max_files, config.snapshot.max_bytes) == (100000, 20 << 30)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
