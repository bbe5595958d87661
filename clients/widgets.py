"""``azureml.widgets``, for ``from labrun.widgets import RunDetails`` (the import rule).

``RunDetails(run).show()`` shows the run's status, times, metrics and child runs: in Jupyter as an
ipywidgets HTML widget when ipywidgets is installed, else as HTML output; both are refreshed every
few seconds until the run ends (by one daemon thread per widget, the only thread of the client).
Anywhere else it prints a text table once. ``get_widget_data()`` returns what is shown.
"""

from __future__ import annotations

import html
import sys
import time

REFRESH_SECONDS = 2.0
TERMINAL = ("Completed", "Failed", "Canceled")


def _in_jupyter() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def _shown(value) -> str:
    if isinstance(value, list):
        return f"{len(value)} values, last {value[-1]!r}" if value else "[]"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_shown(v)}" for k, v in value.items())
    return repr(value) if isinstance(value, str) else str(value)


def render_text(data: dict) -> str:
    rows = [("Run", data["run_id"]), ("Experiment", data["experiment"]), ("Status", data["status"]),
            ("Started", data["start_time"] or "-"), ("Ended", data["end_time"] or "-")]
    if data.get("error"):
        rows.append(("Error", data["error"]))
    rows += [(f"metric {name}", _shown(value)) for name, value in sorted(data["metrics"].items())]
    rows += [(f"child {child['run_id']}", child["status"]) for child in data["children"]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def render_html(data: dict) -> str:
    def table(headers, rows):
        head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = [table(["Run", "Experiment", "Status", "Started", "Ended"],
                   [[data["run_id"], data["experiment"], data["status"], data["start_time"] or "-",
                     data["end_time"] or "-"]])]
    if data.get("error"):
        parts.append(f"<pre>{html.escape(data['error'])}</pre>")
    if data["metrics"]:
        parts.append(table(["Metric", "Value"], [[n, _shown(v)] for n, v in sorted(data["metrics"].items())]))
    if data["children"]:
        parts.append(table(["Child run", "Status"], [[c["run_id"], c["status"]] for c in data["children"]]))
    return "<div class='labrun-run-details'>" + "".join(parts) + "</div>"


class RunDetails:
    def __init__(self, run_instance, **kwargs):
        self.run = run_instance
        self._widget = None

    def get_widget_data(self, widget_settings=None) -> dict:
        details = self.run.get_details()
        error = (details.get("error") or {}).get("error", {}).get("message")
        return {
            "run_id": self.run.id, "experiment": self.run.experiment.name, "status": details["status"],
            "start_time": details.get("startTimeUtc"), "end_time": details.get("endTimeUtc"), "error": error,
            "metrics": self.run.get_metrics(),
            "children": [{"run_id": c.id, "status": c.get_status()} for c in self.run.get_children()],
        }

    def show(self, render_lib=None, widget_settings=None):
        data = self.get_widget_data()
        if not _in_jupyter():
            print(render_text(data))
            return None
        from IPython.display import HTML, display

        try:
            import ipywidgets
        except ImportError:
            handle = display(HTML(render_html(data)), display_id=True)
            update = lambda text: handle.update(HTML(text))   # noqa: E731
        else:
            self._widget = ipywidgets.HTML(value=render_html(data))
            display(self._widget)
            update = lambda text: setattr(self._widget, "value", text)   # noqa: E731
        if data["status"] not in TERMINAL:
            import threading

            threading.Thread(target=self._follow, args=(update,), daemon=True, name="labrun-run-details").start()
        return self._widget

    def _follow(self, update) -> None:
        while True:
            time.sleep(REFRESH_SECONDS)
            try:
                data = self.get_widget_data()
            except Exception as exc:   # the agent went away: say so in the widget and stop
                update(f"<pre>{html.escape(f'labrun: cannot refresh: {exc}')}</pre>")
                return
            update(render_html(data))
            if data["status"] in TERMINAL:
                return
