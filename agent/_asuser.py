"""Doing file work with a user's credentials: the one place the agent (root) becomes someone else.

``as_user(owner, work)`` runs ``work()`` in a forked child that has dropped to the user's
uid, gid and groups for good, and returns what it returned (a short string), or raises
``AsUserFailed`` with the child's error. Whatever ``work`` needs from root (a store file, a
directory the user may not search) is opened *before* the call, in the parent's memory that
the child inherits: the child never regains root. The child only makes system calls and
exits with ``os._exit``; it never returns into the agent's event loop.

When no switch is needed (the agent is not root, or the user is root) ``work`` runs in
this process.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple


class Credentials(NamedTuple):
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


class AsUserFailed(Exception):
    """The work failed in the user's child (the message is the child's error)."""


def needs_switch(uid: int) -> bool:
    return os.geteuid() == 0 and uid != 0


def as_user(credentials: Credentials, work: Callable[[], str]) -> str:
    """Blocking: call it from a worker thread for long work. Raises ``AsUserFailed``."""
    if not needs_switch(credentials.uid):
        try:
            return work()
        except OSError as exc:
            raise AsUserFailed(_describe(exc)) from None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: never returns
        status = 1
        try:
            os.close(read_end)
            os.setgroups(list(credentials.groups) or [credentials.gid])
            os.setresgid(credentials.gid, credentials.gid, credentials.gid)
            os.setresuid(credentials.uid, credentials.uid, credentials.uid)
            message, status = "ok " + work(), 0
        except BaseException as exc:   # noqa: B036 - the child must always reach _exit
            message = "error " + (_describe(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}")
        finally:
            try:
                os.write(write_end, message.encode("utf-8", "replace")[:60_000])
            finally:
                os._exit(status)
    os.close(write_end)
    chunks = []
    try:
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    reply = b"".join(chunks).decode("utf-8", "replace")
    if reply.startswith("ok "):
        return reply[3:]
    raise AsUserFailed(reply[6:] if reply.startswith("error ") else "the helper process died")


def _describe(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else ""
    return f"{exc.strerror or exc}{f': {name}' if name else ''}"
