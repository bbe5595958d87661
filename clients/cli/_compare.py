"""``labrun metrics RUN RUN...``: one table, a column per run, with each metric's last and best value.

Which way is best follows the metric's name, as MLflow users name them: lower for
losses, errors and times (``loss``, ``val_error``, ``mse``, ``latency``...), higher
for everything else (``accuracy``, ``f1``, ``auc``...).
"""

from __future__ import annotations

import json
import re

from . import _format

_LOWER_IS_BETTER = re.compile(r"loss|err|mse|mae|perplexity|\bwer\b|\bcer\b|latency|time|duration|regret",
                              re.IGNORECASE)


def lower_is_better(name: str) -> bool:
    return bool(_LOWER_IS_BETTER.search(name))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def last_and_best(name: str, value) -> tuple[object, object] | None:
    """(last, best) of a scalar metric or a list of numbers; None for rows, tables and text."""
    values = value if isinstance(value, list) else [value]
    numbers = [v for v in values if _number(v)]
    if not numbers or len(numbers) != len(values):
        return None
    return numbers[-1], (min(numbers) if lower_is_better(name) else max(numbers))


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value, default=str) if not isinstance(value, str) else value


def _cell(name: str, value) -> str:
    if value is None:
        return "-"
    summary = last_and_best(name, value)
    if summary is None:
        return "table" if isinstance(value, dict) else f"{len(value)} values" if isinstance(value, list) else _shown(value)
    last, best = summary
    notes = ([] if last == best else [f"best {_shown(best)}"]) + ([f"{len(value)} values"] if isinstance(value, list) else [])
    return _shown(last) + (f" ({', '.join(notes)})" if notes else "")


def table(runs: list[dict], metrics: list[dict]) -> str:
    """The comparison table; the BEST column names the run (by its column) holding the best last value."""
    if not any(metrics):
        return "no metrics"
    headers = ["METRIC", *(_format.name(r) if _format.name(r) != "-" else r["run_id"] for r in runs)]
    rows = []
    for name in sorted({n for m in metrics for n in m}):
        cells = [_cell(name, m.get(name)) for m in metrics]
        candidates = [(summary[1], i) for i, m in enumerate(metrics)
                      if name in m and (summary := last_and_best(name, m[name])) is not None]
        best = "-"
        if len(runs) > 1 and candidates:
            value, i = (min if lower_is_better(name) else max)(candidates, key=lambda c: c[0])
            best = f"{_shown(value)} ({headers[i + 1]})"
        rows.append([name, *cells, *([best] if len(runs) > 1 else [])])
    return _format.table(headers + (["BEST"] if len(runs) > 1 else []), rows)
