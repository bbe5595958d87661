"""Why a run failed, in Azure ML's words: ``User program failed with ValueError: ...``.

Azure ML names the exception from the traceback the program printed. ``describe_traceback`` finds
it in a log's tail (pure); ``failure_message`` reads the tail of a run's logs safely: the logs
directory belongs to the run's user, so every component is opened without following symlinks and
only regular files are read.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

TAIL_BYTES = 64 * 1024
MAX_MESSAGE = 1000
# The last line of a Python traceback: "pkg.module.SomeError: message" (or the bare name).
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::\s?(.*))?$")


def describe_traceback(text: str) -> str | None:
    """``User program failed with Type: message`` from the last traceback in ``text``, or None."""
    start = text.rfind("Traceback (most recent call last):")
    if start < 0:
        return None
    lines = text[start:].splitlines()[1:]
    # The frames are indented; the exception line is the first one that is not.
    for index, line in enumerate(lines):
        if line and not line[0].isspace():
            match = _EXCEPTION_LINE.match(line.rstrip())
            if not match:
                return None
            kind, message = match.group(1), (match.group(2) or "")
            # A multi-line message continues up to the next blank line.
            for more in lines[index + 1:]:
                if not more.strip():
                    break
                message += "\n" + more.rstrip()
            kind = kind.rsplit(".", 1)[-1] if kind.startswith("builtins.") else kind
            text = f"User program failed with {kind}: {message}" if message else f"User program failed with {kind}"
            return text[:MAX_MESSAGE]
    return None


def _read_tail(directory_fd: int, name: str) -> str | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory_fd)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        os.lseek(fd, max(0, info.st_size - TAIL_BYTES), os.SEEK_SET)
        return os.read(fd, TAIL_BYTES).decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def failure_message(run_dir: Path) -> str | None:
    """The failure message from the traceback in the run's logs (rank 0 first), or None."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        run_fd = os.open(run_dir, flags)
    except OSError:
        return None
    try:
        logs_fd = os.open("logs", flags, dir_fd=run_fd)
    except OSError:
        return None
    finally:
        os.close(run_fd)
    try:
        names = sorted((n for n in os.listdir(logs_fd) if n.startswith("std_log") and n.endswith(".txt")),
                       key=lambda n: (n != "std_log.txt", len(n), n))
        for name in names[:64]:
            text = _read_tail(logs_fd, name)
            message = describe_traceback(text) if text else None
            if message:
                return message
        return None
    finally:
        os.close(logs_fd)
