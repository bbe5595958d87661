"""``RunDetails(run).show()`` in a real Jupyter kernel: an ipywidgets widget when ipywidgets is installed, HTML
otherwise, both refreshed until the run ends; and a text table outside Jupyter."""

import time

import pytest

from labrun import Experiment

# The test extra installs these; without them this test fails rather than skips.
import ipykernel  # noqa: F401
import ipywidgets  # noqa: F401
import jupyter_client  # noqa: F401

WIDGET = "application/vnd.jupyter.widget-view+json"


def _execute(client, code: str, timeout: float = 30.0) -> list[dict]:
    """Run ``code`` in the kernel; its iopub messages until the kernel is idle again."""
    msg_id = client.execute(code)
    messages = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = client.get_iopub_msg(timeout=timeout)
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(message)
        if message["msg_type"] == "error":
            raise AssertionError("\n".join(message["content"]["traceback"]))
        if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
            return messages
    raise AssertionError(f"the kernel did not finish {code!r}")


def _until(client, predicate, timeout: float = 30.0) -> dict:
    """The first later iopub message that satisfies ``predicate``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = client.get_iopub_msg(timeout=timeout)
        if predicate(message):
            return message
    raise AssertionError("no such message from the kernel")


@pytest.fixture
def kernel(agent):
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3", env=agent.env)
    try:
        yield client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_run_details_in_jupyter(agent, kernel):
    experiment = Experiment(agent.workspace(), "widgets")
    first = experiment.start_logging(snapshot_directory=None)
    first.log("loss", 0.5)
    show = (f"from labrun import Run, Workspace\nfrom labrun.widgets import RunDetails\n"
            f"RunDetails(Run.get(Workspace(), {first.id!r})).show()\n")

    # With ipywidgets: a widget, whose value follows the run until it ends.
    messages = _execute(kernel, show)
    shown = [m for m in messages if m["msg_type"] == "display_data"]
    assert shown and WIDGET in shown[0]["content"]["data"]
    opened = [m for m in messages if m["msg_type"] == "comm_open"
              and "<td>Running</td>" in str(m["content"]["data"].get("state", {}).get("value", ""))]
    assert opened and "<td>loss</td><td>0.5</td>" in opened[0]["content"]["data"]["state"]["value"]
    first.log("loss", 0.25)
    first.complete()
    update = _until(kernel, lambda m: m["msg_type"] == "comm_msg"
                    and "<td>Completed</td>" in str(m["content"]["data"].get("state", {}).get("value", "")))
    assert "2 values, last 0.25" in update["content"]["data"]["state"]["value"]

    # Without ipywidgets: HTML output, updated in place until the run ends.
    second = experiment.start_logging(snapshot_directory=None)
    messages = _execute(kernel, "import sys\nsys.modules['ipywidgets'] = None\n" + show.replace(first.id, second.id))
    shown = [m for m in messages if m["msg_type"] == "display_data"]
    assert shown and WIDGET not in shown[0]["content"]["data"]
    assert "<td>Running</td>" in shown[0]["content"]["data"]["text/html"]
    second.fail("stopped")
    update = _until(kernel, lambda m: m["msg_type"] == "update_display_data")
    html = update["content"]["data"]["text/html"]
    assert "<td>Failed</td>" in html and "<pre>stopped</pre>" in html


def test_run_details_elsewhere_is_a_text_table(agent, capsys):
    run = Experiment(agent.workspace(), "widgets").start_logging(snapshot_directory=None)
    run.log_list("accuracy", [0.5, 0.75])
    run.complete()
    from labrun.widgets import RunDetails

    assert RunDetails(run).show() is None
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(maxsplit=1) for line in lines[:3]] == [["Run", run.id], ["Experiment", "widgets"],
                                                              ["Status", "Completed"]]
    assert any(line.split() == ["metric", "accuracy", "2", "values,", "last", "0.75"] for line in lines)
