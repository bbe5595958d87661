"""How a run in a container reaches the agent's MLflow server (pure: no Docker)."""

from labrun.agent._mlflow_setup import container_uri


def test_a_server_elsewhere_is_reached_as_it_is():
    assert container_uri("https://mlflow.lab:8443", "bridge", None, False) == ("https://mlflow.lab:8443", "")
    assert container_uri("http://10.1.2.3:5000", "my-net", None, False) == ("http://10.1.2.3:5000", "")


def test_loopback_on_the_host_network_is_the_host():
    assert container_uri("http://127.0.0.1:5000", "host", None, False) == ("http://127.0.0.1:5000", "")


def test_loopback_on_a_bridge_goes_through_the_gateway_only_if_the_server_listens_there():
    assert container_uri("http://localhost:5000", "bridge", "172.17.0.1", True) == ("http://172.17.0.1:5000", "")
    assert container_uri("http://u@[::1]:5000/p", "bridge", "fd00::1", True) == ("http://u@[fd00::1]:5000/p", "")
    uri, why = container_uri("http://127.0.0.1:5000", "bridge", "172.17.0.1", False)
    assert uri is None and "does not listen on the host's address there, 172.17.0.1" in why
    uri, why = container_uri("http://127.0.0.1:5000", "my-net", None, False)
    assert uri is None and "'my-net'" in why
    assert container_uri("http://127.0.0.1:5000", "none", "172.17.0.1", True)[0] is None
