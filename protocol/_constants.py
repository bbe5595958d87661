"""Constants the thin client needs without loading the validators."""

MAX_DURATION_SECONDS_DEFAULT = 2592000


def __getattr__(name: str):
    # EXPERIMENT_NAME_RE is compiled on first use: a CLI submit needs the constant above, not ``re``.
    if name == "EXPERIMENT_NAME_RE":
        import re

        value = globals()[name] = re.compile(r"^[a-zA-Z0-9][\w\-]{0,254}$")
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
