"""Metric values and shapes, as in Azure ML: what may be logged, and how ``get_metrics`` folds it."""

from __future__ import annotations

import warnings

from .exceptions import UserErrorException

SCALARS = (int, float, str, bool, type(None))


def scalar(value, what: str):
    """A loggable scalar; numpy scalars become Python ones, anything else its ``repr`` with a warning."""
    if isinstance(value, SCALARS):
        return value
    item = getattr(value, "item", None)   # numpy scalars, without importing numpy
    if callable(item) and getattr(value, "shape", None) == ():
        return item()
    warnings.warn(f"{what}: {type(value).__name__} is not a scalar metric type; logging its repr", stacklevel=4)
    return repr(value)


def check_not_list(value):
    if isinstance(value, (list, tuple, range)) or hasattr(value, "__next__"):
        raise UserErrorException("run.log does not support list type. Use run.log_list instead")


def _columns(rows: list[dict]) -> dict:
    columns: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            columns.setdefault(key, []).append(value)
    if len(rows) == 1:
        return {k: v[0] for k, v in columns.items()}
    return columns


def fold(records: list[dict]) -> dict:
    """Agent metric records -> Azure ML's ``get_metrics()`` dict (a bare scalar when logged once)."""
    values: dict[str, list] = {}
    kinds: dict[str, str] = {}
    for record in records:
        name, kind, value = record["name"], record["kind"], record["value"]
        kinds.setdefault(name, kind)
        bucket = values.setdefault(name, [])
        if kind == "list":
            bucket.extend(value)
        elif kind == "table":
            length = max((len(v) for v in value.values() if isinstance(v, list)), default=1)
            bucket.extend({k: (v[i] if isinstance(v, list) else v) for k, v in value.items()} for i in range(length))
        else:
            bucket.append(value)
    folded = {}
    for name, bucket in values.items():
        if kinds[name] in ("row", "table"):
            folded[name] = _columns(bucket)
        else:
            folded[name] = bucket[0] if len(bucket) == 1 else bucket
    return folded
