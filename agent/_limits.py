"""Limits on what one connection or one user can make the agent hold, and the file descriptors it keeps.

``[limits]`` in the agent's config sets them (``LimitsConfig`` lists every key and its
default). The server asks ``Limits`` before it buffers bytes, takes a request or
accepts a connection; each refusal is an error that names the limit and its key, so
an admin knows what to raise and a user knows what they hit. Accounting is plain
counters: no I/O, so it is tested without sockets.

File descriptors: at start the agent raises its soft ``RLIMIT_NOFILE`` to the hard
limit, and refuses new connections while fewer than ``reserved_fds`` remain, so the
agent itself (its database, run log files, pipes of starting runs) never meets
"Too many open files" because of idle clients. Files clients pass (``blob_fds``) are
held at most to half of what the agent does not keep (a quarter for one user), whatever
the per-connection and per-user keys say: a user keeping many queued on many connections
never brings the agent to its limit.
"""

from __future__ import annotations

import ctypes
import os
import resource
from collections import Counter
from dataclasses import dataclass, fields

from labrun.protocol import BadRequest, TooLarge, Unavailable
from labrun.protocol._limits import DESCRIPTION_MAX, DISPLAY_NAME_MAX, LABEL_KEY_MAX, LABEL_VALUE_MAX


@dataclass
class LimitsConfig:
    buffer_bytes_per_connection: int = 16 * 1024 * 1024   # partial frames; also the largest frame accepted
    buffer_bytes_per_user: int = 64 * 1024 * 1024
    buffer_bytes_total: int = 256 * 1024 * 1024
    requests_per_connection: int = 128
    requests_per_user: int = 1024
    connections_per_user: int = 256
    idle_timeout_seconds: float = 900.0
    frame_timeout_seconds: float = 60.0
    reserved_fds: int = 128
    # Open files a client passes with its snapshot (blob_fds): held only until each is copied.
    passed_fds_per_connection: int = 4096
    passed_fds_per_user: int = 16384
    label_key_chars: int = LABEL_KEY_MAX
    label_value_chars: int = LABEL_VALUE_MAX
    labels_bytes_per_run: int = 256 * 1024
    display_name_chars: int = DISPLAY_NAME_MAX
    description_chars: int = DESCRIPTION_MAX
    list_page_bytes: int = 4 * 1024 * 1024


# The protocol's own bounds: a config may lower these, never raise them.
_CEILINGS = {"label_key_chars": LABEL_KEY_MAX, "label_value_chars": LABEL_VALUE_MAX,
             "display_name_chars": DISPLAY_NAME_MAX, "description_chars": DESCRIPTION_MAX}


def load_limits(table: dict, max_frame_bytes: int, error: type[Exception]) -> LimitsConfig:
    """Read ``[limits]``; the per-connection buffer defaults to ``agent.max_frame_bytes``.

    Raises:
        error: naming the key, for an unknown key or a value that is not a positive number in range.
    """
    limits = LimitsConfig(buffer_bytes_per_connection=max_frame_bytes)
    known = {f.name: f.type for f in fields(LimitsConfig)}
    for key, value in table.items():
        if key not in known:
            raise error(f"[limits]: unknown key {key!r} (known: {', '.join(sorted(known))})")
        floats = known[key] == "float"
        if isinstance(value, bool) or not isinstance(value, (int, float) if floats else int) or value <= 0:
            raise error(f"limits.{key}: expected a positive {'number' if floats else 'integer'}, got {value!r}")
        if key in _CEILINGS and value > _CEILINGS[key]:
            raise error(f"limits.{key}: at most {_CEILINGS[key]} (the protocol's own bound), got {value}")
        setattr(limits, key, float(value) if floats else value)
    if limits.list_page_bytes > limits.buffer_bytes_per_connection // 2:
        limits.list_page_bytes = max(1, limits.buffer_bytes_per_connection // 2)
    return limits


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one; returns the (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def tune_malloc() -> None:
    """Make memory the agent frees go back to the system, so a burst of large frames does not stay in its RSS.

    glibc raises its mmap threshold after each large free (up to 32 MiB), after which large buffers come from the
    heap and fragment it; a thread's arena keeps what a worker thread freed. A fixed threshold, a low trim
    threshold and two arenas keep the agent's RSS near what it holds. Elsewhere than glibc this does nothing.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    for parameter, value in ((_M_MMAP_THRESHOLD, 128 * 1024), (_M_TRIM_THRESHOLD, 256 * 1024), (_M_ARENA_MAX, 2)):
        mallopt(ctypes.c_int(parameter), ctypes.c_int(value))


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1   # less the descriptor listdir itself holds
    except OSError:
        return 0


def _add(counter: Counter, uid: int, delta: int) -> None:
    """Change one user's count; users at zero leave the counter, so it never grows with uids seen."""
    counter[uid] += delta
    if counter[uid] <= 0:
        del counter[uid]


class Limits:
    """Counters shared by every connection: buffered bytes (per user and in total) and connections per user."""

    def __init__(self, config: LimitsConfig):
        self.config = config
        self.buffered_total = 0
        self.buffered_by_user: Counter[int] = Counter()
        self.connections_by_user: Counter[int] = Counter()
        self.requests_by_user: Counter[int] = Counter()
        self.fds_by_user: Counter[int] = Counter()

    # -- connections -------------------------------------------------------------------

    def admit(self, uid: int, fd: int) -> None:
        """Count a new connection of ``uid``, whose socket is ``fd``.

        Raises:
            Unavailable: the user already holds ``connections_per_user``, or the agent is near its fd limit.
        """
        reserve = self.config.reserved_fds
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        # Descriptors are handed out lowest first, so a high number means at least that many are open;
        # only then is it worth counting them exactly.
        if fd >= (soft - reserve) // 2 and soft - _open_fds() < reserve:
            raise Unavailable(f"the agent is near its open-file limit ({soft}) and keeps the last {reserve} "
                              "descriptors for itself and its runs (limits.reserved_fds); close idle "
                              "connections or ask the admin to raise LimitNOFILE",
                              details={"limit": "reserved_fds"})
        if self.connections_by_user[uid] >= self.config.connections_per_user:
            raise Unavailable(f"too many connections from uid {uid}: at most {self.config.connections_per_user} "
                              "at once (limits.connections_per_user); close some",
                              details={"limit": "connections_per_user"})
        self.connections_by_user[uid] += 1

    def release(self, uid: int) -> None:
        _add(self.connections_by_user, uid, -1)

    # -- requests in flight ------------------------------------------------------------

    def start_request(self, uid: int, in_flight_here: int) -> None:
        """Count one more request in flight for ``uid``, whose connection already has ``in_flight_here``.

        Raises:
            Unavailable: past ``requests_per_connection`` or ``requests_per_user``.
        """
        if in_flight_here >= self.config.requests_per_connection:
            raise Unavailable(f"too many requests in flight on this connection: at most "
                              f"{self.config.requests_per_connection} (limits.requests_per_connection); wait for "
                              "replies before sending more", details={"limit": "requests_per_connection"})
        if self.requests_by_user[uid] >= self.config.requests_per_user:
            raise Unavailable(f"too many requests in flight from uid {uid}: at most {self.config.requests_per_user} "
                              "over all its connections (limits.requests_per_user)",
                              details={"limit": "requests_per_user"})
        self.requests_by_user[uid] += 1

    def end_request(self, uid: int) -> None:
        _add(self.requests_by_user, uid, -1)

    # -- descriptors passed by clients -------------------------------------------------

    def hold_fds(self, uid: int, held_here: int, count: int) -> None:
        """Count ``count`` more descriptors passed by ``uid``, whose connection already holds ``held_here``.

        Raises:
            Unavailable: past ``passed_fds_per_connection`` or ``passed_fds_per_user``.
        """
        if held_here + count > self.config.passed_fds_per_connection:
            raise Unavailable(f"more than {self.config.passed_fds_per_connection} open files passed on this "
                              "connection and not yet copied (limits.passed_fds_per_connection); wait for replies "
                              "before sending more", details={"limit": "passed_fds_per_connection"})
        room = self._passed_fds_room()
        per_user = min(self.config.passed_fds_per_user, room // 2)
        if self.fds_by_user[uid] + count > per_user:
            raise Unavailable(f"more than {per_user} open files passed by uid {uid} and not "
                              "yet copied, over all its connections (limits.passed_fds_per_user, and a quarter of "
                              "the agent's open-file limit less limits.reserved_fds)",
                              details={"limit": "passed_fds_per_user"})
        if sum(self.fds_by_user.values()) + count > room:
            raise Unavailable(f"the agent holds {room} open files passed by clients and not yet copied, half of its "
                              "open-file limit less limits.reserved_fds; try again shortly",
                              details={"limit": "passed_fds_total"})
        self.fds_by_user[uid] += count

    def _passed_fds_room(self) -> int:
        """How many passed files the agent holds at most, over all users."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return max(2, (soft - self.config.reserved_fds) // 2)

    def passed_fds_per_request(self) -> int:
        """How many open files one ``blob_fds`` may pass: the connection's limit, less where the agent's own
        open-file limit is low (a quarter of what it does not keep for itself)."""
        return max(1, min(self.config.passed_fds_per_connection, self._passed_fds_room() // 2))

    def release_fds(self, uid: int, count: int) -> None:
        _add(self.fds_by_user, uid, -count)

    # -- buffered bytes ----------------------------------------------------------------

    def buffer(self, uid: int, before: int, after: int) -> None:
        """Account one connection's partial frame growing from ``before`` to ``after`` bytes (or shrinking).

        Raises:
            Unavailable: growing would pass ``buffer_bytes_per_user`` or ``buffer_bytes_total``.
        """
        delta = after - before
        if delta > 0:
            if self.buffered_by_user[uid] + delta > self.config.buffer_bytes_per_user:
                raise Unavailable(f"uid {uid} has more than {self.config.buffer_bytes_per_user} bytes of unfinished "
                                  "requests buffered in the agent (limits.buffer_bytes_per_user); send whole "
                                  "frames, on fewer connections at once",
                                  details={"limit": "buffer_bytes_per_user"})
            if self.buffered_total + delta > self.config.buffer_bytes_total:
                raise Unavailable(f"the agent holds {self.buffered_total} bytes of unfinished requests from all "
                                  f"clients, its limit (limits.buffer_bytes_total); try again shortly",
                                  details={"limit": "buffer_bytes_total"})
        self.buffered_total += delta
        _add(self.buffered_by_user, uid, delta)

    def status(self) -> dict:
        return {"buffered_bytes": self.buffered_total,
                "connections": sum(self.connections_by_user.values()),
                "requests_in_flight": sum(self.requests_by_user.values()),
                "open_fds": _open_fds(),
                "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}


def labels_size(labels: dict) -> int:
    """Bytes of a run's labels as ``labels_bytes_per_run`` counts them: UTF-8 keys and values."""
    return sum(len(k.encode()) + len((v or "").encode()) for k, v in labels.items())


def check_labels(config: LimitsConfig, field: str, values: dict, others: int = 0) -> None:
    """Hold one map of tags or properties to the configured sizes; ``others``: bytes the run's other labels use.

    Raises:
        BadRequest: a key or value longer than allowed, naming it and the limit's key.
        TooLarge: the run's labels together pass ``labels_bytes_per_run``.
    """
    for key, value in values.items():
        if len(key) > config.label_key_chars:
            raise BadRequest(f"{field}: key {key[:40]!r}... is {len(key)} characters; the limit is "
                             f"{config.label_key_chars} (limits.label_key_chars)", details={"field": field})
        if value is not None and len(value) > config.label_value_chars:
            raise BadRequest(f"{field}.{key[:80]}: value is {len(value)} characters; the limit is "
                             f"{config.label_value_chars} (limits.label_value_chars)",
                             details={"field": f"{field}.{key[:80]}"})
    total = others + labels_size(values)
    if total > config.labels_bytes_per_run:
        raise TooLarge(f"{field}: the run's tags and properties would take {total} bytes; the limit is "
                       f"{config.labels_bytes_per_run} per run (limits.labels_bytes_per_run)",
                       details={"field": field})


def check_text(config: LimitsConfig, field: str, value: str | None, key: str) -> None:
    """A display name or description within ``limits.<key>`` characters."""
    limit = getattr(config, key)
    if value is not None and len(value) > limit:
        raise BadRequest(f"{field}: {len(value)} characters; the limit is {limit} (limits.{key})",
                         details={"field": field})
