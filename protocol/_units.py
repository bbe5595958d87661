"""Human units shared by the CLI, the client and the agent's config: memory sizes and durations.

``re`` is imported by the functions that parse: the CLI formats sizes on paths that never parse one, and
importing ``re`` (with ``enum``) costs a command a few milliseconds. ``re`` keeps the compiled patterns.
"""

from __future__ import annotations

_MEMORY_SUFFIX = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_MEMORY_PATTERN = r"(?i)^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$"
_DURATION_PATTERN = r"(\d+(?:\.\d+)?)([dhms])"
_DURATION_UNIT = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_memory(value: str | int) -> int:
    """``"4G"``, ``"512M"``, ``"1.5g"``, ``"2GiB"`` or a byte count -> bytes (powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"memory must be a size like '4G', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"memory must not be negative, got {value}")
        return value
    import re

    match = re.match(_MEMORY_PATTERN, str(value))
    if not match:
        raise ValueError(f"memory must be a size like '512M' or '4G', got {value!r}")
    number, suffix = match.groups()
    return int(float(number) * _MEMORY_SUFFIX[suffix.lower()])


def parse_duration(value: str | int | float) -> int:
    """``"90"``, ``"1h30m"``, ``"2d"``, ``"45s"`` or a number of seconds -> whole seconds."""
    if isinstance(value, bool):
        raise ValueError(f"duration must be seconds or like '1h30m', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = value
    else:
        import re

        text = str(value).strip().lower()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif text and re.sub(_DURATION_PATTERN, "", text) == "":
            seconds = sum(float(n) * _DURATION_UNIT[u] for n, u in re.findall(_DURATION_PATTERN, text))
        else:
            raise ValueError(f"duration must be seconds or like '1h30m', got {value!r}")
    seconds = int(seconds)
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return seconds


def format_memory(size: int | None) -> str:
    if size is None:
        return "-"
    for suffix, factor in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size >= factor:
            value = size / factor
            return f"{value:.0f}{suffix}" if value == int(value) else f"{value:.1f}{suffix}"
    return f"{size}B"


_ARRAY_PART_PATTERN = r"^(\d+)(?:-(\d+)(?::(\d+))?)?$"


def parse_array(value: str, max_size: int = 10_000) -> tuple[list[int], int]:
    """Slurm's ``--array`` forms -> (indices, throttle): ``1-20``, ``1,3,5``, ``0-15:4``, ``1-5,10``, ``...%4``.

    Throttle 0 means no limit. Indices are sorted and distinct.
    """
    import re

    text, _, throttle_text = str(value).strip().partition("%")
    throttle = 0
    if throttle_text:
        if not throttle_text.isdigit() or int(throttle_text) < 1:
            raise ValueError(f"array: the limit after % must be a positive number, got {throttle_text!r}")
        throttle = int(throttle_text)
    indices: set[int] = set()
    for part in text.split(","):
        match = re.match(_ARRAY_PART_PATTERN, part.strip())
        if not match:
            raise ValueError(f"array: {part.strip()!r} is not an index, a range like 1-20, or a stepped range "
                             "like 0-15:4")
        first, last, step = int(match[1]), int(match[2] or match[1]), int(match[3] or 1)
        if last < first or step < 1:
            raise ValueError(f"array: {part.strip()!r} is an empty range")
        if (last - first) // step + 1 + len(indices) > max_size:
            raise ValueError(f"array: more than {max_size} runs")
        indices.update(range(first, last + 1, step))
    return sorted(indices), throttle
