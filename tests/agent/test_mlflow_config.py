"""The agent config's [mlflow] section."""

import pytest

from labrun.agent import ConfigError, load_config


def load(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load_config(path)


def test_an_existing_server(tmp_path):
    config = load(tmp_path, '[mlflow]\ntracking_uri = "http://127.0.0.1:5000/"\nrun_env = false\n'
                            'max_artifact_mb = 10\nprepare_timeout_seconds = 0.5\nusername = "labrun"\n'
                            'pool_size = 0\npool_max_size = 5\npool_max_age_seconds = 30\n')
    mlflow = config.mlflow
    assert mlflow.tracking_uri == "http://127.0.0.1:5000" and not mlflow.embedded and not mlflow.run_env
    assert mlflow.max_artifact_bytes == 10 << 20 and mlflow.prepare_timeout_seconds == 0.5
    assert mlflow.username == "labrun" and mlflow.artifacts
    assert mlflow.pool_size == 0 and mlflow.pool_max_size == 5 and mlflow.pool_max_age_seconds == 30
    # Without pool_max_size, a pool_size above its default is its bound too.
    assert load(tmp_path, '[mlflow]\ntracking_uri = "http://x"\npool_size = 20\n').mlflow.pool_max_size == 20
    assert load(tmp_path, '[mlflow]\ntracking_uri = "http://x"\n').mlflow.pool_max_size == 16
    assert load_config(None).mlflow is None


def test_embedded(tmp_path):
    config = load(tmp_path, '[mlflow]\nembedded = true\nport = 5123\nuser = "nobody"\n')
    assert config.mlflow.embedded and config.mlflow.port == 5123 and config.mlflow.tracking_uri is None
    assert config.mlflow.user == "nobody"


@pytest.mark.parametrize("text, message", [
    ("[mlflow]\n", "either tracking_uri"),
    ('[mlflow]\nembedded = true\ntracking_uri = "http://x"\n', "either tracking_uri"),
    ('[mlflow]\ntracking_uri = "file:///tmp/mlruns"\n', "http:// or https://"),
    ('[mlflow]\ntracking_uri = "http://x"\nport = 70000\n', "between 0 and 65535"),
    ('[mlflow]\ntracking_uri = "http://x"\nembeded = true\n', "unknown key 'embeded'"),
    ('[mlflow]\ntracking_uri = "http://x"\ntimeout_seconds = 0\n', "must be positive"),
    ('[mlflow]\ntracking_uri = "http://x"\npool_size = -1\n', "pool_size: must be between 0 and 100"),
    ('[mlflow]\ntracking_uri = "http://x"\npool_size = 4\npool_max_size = 3\n',
     r"pool_max_size: must be between pool_size \(4\) and 100"),
    ('[mlflow]\ntracking_uri = "http://x"\npool_max_size = 101\n', "pool_max_size: must be between"),
    ('[mlflow]\nembedded = true\nuser = "no-such-user-here"\n', "no account"),
])
def test_mistakes_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)
