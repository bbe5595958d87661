"""Fuzzing a live agent: random bytes, broken frames and random requests for every op, from a seeded generator.

    python bench/fuzz.py [--frames N] [--seconds S] [--seed N] [--connections N] [--json PATH] [--markdown PATH]

Starts its own ``labrund`` on a temporary socket and state directory, then keeps
``--connections`` clients busy until ``--frames`` frames were sent (or ``--seconds``
passed). Each client connection gets a random *kind*:

- ``bytes``: random bytes, with or without a ``hello`` first;
- ``truncated``: a frame whose header announces more than is sent, then a close;
- ``oversized``: a header announcing more than the agent's frame limit;
- ``envelope``: well-formed msgpack with random envelopes (ids, ops, arg types);
- ``requests``: ``hello`` then well-formed requests of every op, with random values
  for every argument, derived from the protocol's own schemas (random types, edge
  integers such as 2**63, NaN, infinities, NUL and control characters, huge strings);
- ``fds``: open files passed with frames (SCM_RIGHTS), as ``blob_fds`` passes a
  snapshot's files: regular files small and large, empty and ``/proc`` ones, and what
  the agent must refuse (a directory, a device, pipe ends, a socket, a write-only and an
  ``O_PATH`` descriptor), with ``blob_fds`` requests whose count is right or wrong, with
  other requests, with broken bytes, and by the hundred in one message.

Submits are fuzzed too. One in twenty has its command, environment, Docker, distribution
and ``resume_from`` fields pinned (it runs ``true``, if the rest of its random spec is
valid), so the fuzzer never makes the machine build environments or copy trees; the
others are random throughout, and refused. Nine watches in ten start from now: a replay of
the whole history is fuzzed too, but costs time in proportion to the history.

Every batch on a live connection ends with a ``status`` request that must be answered
within ``HANG_SECONDS``, and a separate probe asks ``status`` every second: a missing
answer is a *hang*; the agent process exiting is a *crash*. Pass: no crash, no hang, and
the agent's RSS at the end within 10% of its RSS after the warm-up, and its open
descriptors at the end no more than ``FD_SLACK`` above their number after the warm-up
(a passed file the agent failed to close shows up there).

Memory is compared between two like moments. The warm-up (``WARMUP_FRAMES`` of the same
fuzzing) brings the agent to its steady state: SQLite's page and statement caches fill to
their bounds, and whatever the fuzzed ops switch on for good is on; in particular ``ui``
(the embedded MLflow server, and the mirror that copies every run to it: about 6 MiB of
code and clients) is asked for once, so that whether a random ``ui`` happens to come
before or after the first reading does not decide the result. Both readings are then
taken *quiet*: fuzzing paused, every run the fuzzer submitted ended (none queued or
running) and the MLflow mirror caught up, then ``SETTLE_SECONDS``. What still grows
between the two readings is memory the agent keeps for good.
"""

from __future__ import annotations

import argparse
import array
import inspect
import io
import json
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import msgpack
import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from run import rss_mib  # noqa: E402  (bench/run.py: the same RSS reader as the benchmarks)

from labrun.agent._server import socket_answers  # noqa: E402
from labrun.protocol import PROTOCOL_VERSION  # noqa: E402
from labrun.protocol._schema import OP_SCHEMAS, RUN_SPEC  # noqa: E402

HANG_SECONDS = 30.0
WARMUP_FRAMES = 50_000
QUIET_TIMEOUT = 600.0   # at most this long for the fuzzer's runs to end and the mirror to catch up
SETTLE_SECONDS = 2.0
FD_SLACK = 32   # descriptors the agent may hold at the end beyond its count after the warm-up (its clients come and go)
BATCH = 100
# Spec fields whose valid values would make the agent do heavy or machine-wide work; see the docstring.
PINNED_SPEC = {"command": ["true"], "script": None, "environment": None, "docker": None, "distributed": None,
               "resume_from": None, "compute_target": "local", "interpreter": None,
               "resources": {"cpus": 1, "memory": None, "gpus": 0}}
# msgpack carries -2**63 .. 2**64-1: the extremes of both ends.
EDGE_INTS = [0, 1, -1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), 2**64 - 1]
EDGE_FLOATS = [0.0, -0.0, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf]


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


SNAPSHOTS = [_tar({}), _tar({"a.py": b"print(1)\n"}), b"", b"not a tar"]
EMPTY_HASH = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"   # sha256 of nothing
# Manifests for pinned submits: empty, one empty file, and two the agent must refuse.
MANIFESTS = [[], [["a.py", 0, 0o644, EMPTY_HASH]], [["outputs", 0, 0o644, EMPTY_HASH]],
             [["../x", 0, 0o644, EMPTY_HASH]]]


class Values:
    """Random values: sometimes of the type a validator wants (with edge cases), often anything at all."""

    def __init__(self, rng: random.Random, run_ids: list[str]):
        self.rng = rng
        self.run_ids = run_ids

    def text(self) -> str:
        r = self.rng
        choice = r.random()
        if choice < 0.3 and self.run_ids:
            return r.choice(self.run_ids)
        if choice < 0.4:
            return r.choice(["", ".", "..", "/", "../../etc/passwd", "outputs", "logs/std_log.txt", "a=b",
                             "x\0y", "\x1b[31m", "std_log.txt", "local", "docker", "Completed", "fuzz"])
        alphabet = "abc_-./=\0\n\x1b é☃" if r.random() < 0.5 else "abcdefghij0123456789_-"
        roll = r.random()
        # Mostly short; sometimes past the label and name limits; rarely past the argument limits.
        length = r.choice([0, 1, 5, 20]) if roll < 0.9 else 300 if roll < 0.97 else 5000 if roll < 0.995 else 200_000
        return "".join(r.choices(alphabet, k=min(length, 300))) * max(1, length // 300)

    def anything(self, depth: int = 0):
        r = self.rng
        kind = r.randrange(10 if depth < 3 else 7)
        if kind == 0:
            return None
        if kind == 1:
            return r.random() < 0.5
        if kind == 2:
            return r.choice(EDGE_INTS) if r.random() < 0.5 else r.randint(-1000, 10**6)
        if kind == 3:
            return r.choice(EDGE_FLOATS) if r.random() < 0.5 else r.uniform(-1e6, 1e6)
        if kind == 4:
            return self.text()
        if kind == 5:
            return r.randbytes(r.choice([0, 10, 1000]))
        if kind == 6:
            return r.choice(SNAPSHOTS)
        if kind in (7, 8):
            return [self.anything(depth + 1) for _ in range(r.choice([0, 1, 3]))]
        return {self.text()[:20]: self.anything(depth + 1) for _ in range(r.choice([0, 1, 3]))}

    def for_validator(self, validator, depth: int = 0):
        """A value aimed at ``validator`` (a struct gets its own fields), or anything at all."""
        r = self.rng
        if r.random() < 0.15 or depth > 4:
            return self.anything(depth)
        name = getattr(validator, "__qualname__", "")
        fields = _struct_fields(validator)
        if fields is not None:
            return {key: self.for_validator(field.validator, depth + 1)
                    for key, field in fields.items() if r.random() < (0.9 if field.required else 0.5)}
        if name.startswith("integer") or name.startswith("number"):
            return r.choice(EDGE_INTS + EDGE_FLOATS) if r.random() < 0.3 else r.randint(0, 100)
        if name.startswith("boolean"):
            return r.random() < 0.5
        if name.startswith("binary"):
            return r.choice(SNAPSHOTS)
        if name.startswith("list_of"):
            return [self.text() for _ in range(r.choice([0, 1, 3]))]
        if name.startswith("map_of"):
            size = r.choice([0, 1, 5]) if r.random() < 0.99 else 1000
            return {self.text()[:r.choice([1, 10, 300])] + str(i): self.text()[:r.choice([1, 100, 5000])]
                    for i in range(size)}
        return self.text()

    def request(self, id: int) -> dict:
        op = self.rng.choice(sorted(OP_SCHEMAS))
        if op == "submit":
            return {"id": id, "op": op, "args": {"spec": self.spec()}}
        args = self.for_validator(OP_SCHEMAS[op])
        if isinstance(args, dict):
            # A wait, watch or log follow with no end would be "hung" by design: bound it.
            if op == "wait":
                args["timeout"] = self.rng.choice([0, 0.01, 0.5])
            if op in ("watch", "logs"):
                args["follow"] = False
            # A replay of the whole event history is legitimate but costs O(history): mostly watch from now.
            if op == "watch" and self.rng.random() < 0.9:
                args["since"] = None
        return {"id": id, "op": op, "args": args}

    def spec(self) -> dict:
        spec = self.for_validator(RUN_SPEC)
        # One submit in twenty is pinned to be harmless and likely valid: enough runs to fuzz every op against
        # real ones, few enough that the history (which list and watch walk) stays small.
        if isinstance(spec, dict) and self.rng.random() < 0.05:
            spec["experiment"] = spec.get("experiment") if self.rng.random() < 0.3 else "fuzz"
            spec.update({k: v for k, v in PINNED_SPEC.items()})
            spec["snapshot"] = {"files": self.rng.choice(MANIFESTS)}
            if self.rng.random() < 0.5:
                spec.pop("environ", None)
                spec.pop("environment_variables", None)
        return spec


def _struct_fields(validator) -> dict | None:
    if not getattr(validator, "__qualname__", "").startswith("struct."):
        return None
    return inspect.getclosurevars(validator).nonlocals.get("fields")


def frame(message) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


HELLO = frame({"id": 0, "op": "hello", "args": {"protocol": PROTOCOL_VERSION, "client": "fuzz"}})
SENTINEL_ID = 10**6
SENTINEL = frame({"id": SENTINEL_ID, "op": "status", "args": {}})


def open_files(root: Path) -> list[int]:
    """The descriptors the ``fds`` kind passes: what ``blob_fds`` takes, and what it must refuse."""
    small, large, empty = root / "small", root / "large", root / "empty"
    small.write_bytes(os.urandom(1024))
    large.write_bytes(os.urandom(3 << 20))   # over the agent's in-memory size: copied in the kernel
    empty.write_bytes(b"")
    read, write = os.pipe()
    ours, _theirs = socket.socketpair()
    return [os.open(small, os.O_RDONLY), os.open(large, os.O_RDONLY), os.open(empty, os.O_RDONLY),
            os.open("/proc/self/status", os.O_RDONLY), os.open(small, os.O_WRONLY), os.open(small, os.O_PATH),
            os.open(root, os.O_RDONLY | os.O_DIRECTORY), os.open("/dev/null", os.O_RDONLY), read, write,
            os.dup(ours.fileno())]


class Fuzzer:
    def __init__(self, socket_path: str, seed: int, frames: int, seconds: float, max_frame: int,
                 fds: list[int] = ()):
        self.socket_path = socket_path
        self.fds = list(fds)
        self.seed = seed
        self.target = frames
        self.deadline = time.monotonic() + seconds
        self.max_frame = max_frame
        self.sent = Counter()        # frames by kind
        self.replies = Counter()     # reply error codes ("ok" for successes)
        self.closed_by_agent = 0
        self.hangs: list[str] = []
        self.run_ids: list[str] = []

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def done(self) -> bool:
        return self.total >= self.target or time.monotonic() >= self.deadline or bool(self.hangs)

    async def _connect(self) -> trio.SocketStream:
        return await trio.open_unix_socket(self.socket_path)

    async def worker(self, index: int) -> None:
        rng = random.Random(f"{self.seed}-{index}")
        values = Values(rng, self.run_ids)
        while not self.done():
            kind = rng.choices(["bytes", "truncated", "oversized", "envelope", "requests", "fds"],
                               [1, 1, 1, 2, 10, 1 if self.fds else 0])[0]
            try:
                await getattr(self, f"_{kind}")(rng, values)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.closed_by_agent += 1

    async def _bytes(self, rng, values) -> None:
        stream = await self._connect()
        async with stream:
            if rng.random() < 0.5:
                await stream.send_all(HELLO)
            for _ in range(rng.randint(1, 5)):
                await stream.send_all(rng.randbytes(rng.choice([1, 4, 100, 5000])))
                self.sent["bytes"] += 1

    async def _truncated(self, rng, values) -> None:
        stream = await self._connect()
        async with stream:
            await stream.send_all(HELLO)
            whole = frame(values.request(1))
            await stream.send_all(whole[:rng.randrange(1, len(whole))])
            self.sent["truncated"] += 1

    async def _oversized(self, rng, values) -> None:
        stream = await self._connect()
        async with stream:
            if rng.random() < 0.5:
                await stream.send_all(HELLO)
            await stream.send_all(struct.pack(">I", rng.randint(self.max_frame + 1, 2**32 - 1)) + rng.randbytes(64))
            self.sent["oversized"] += 1
            await self._drain(stream, None)

    async def _envelope(self, rng, values) -> None:
        stream = await self._connect()
        async with stream:
            data = bytearray(HELLO)
            for _ in range(BATCH // 4):
                message = {values.text()[:10]: values.anything() for _ in range(rng.randint(0, 4))}
                if rng.random() < 0.7:
                    message.update({"id": values.anything(), "op": rng.choice([*OP_SCHEMAS, values.text()]),
                                    "args": values.anything()})
                data += frame(message)
                self.sent["envelope"] += 1
            await self._exchange(stream, bytes(data))

    async def _requests(self, rng, values) -> None:
        stream = await self._connect()
        async with stream:
            data = bytearray(HELLO)
            for i in range(BATCH):
                data += frame(values.request(i + 1))
                self.sent["requests"] += 1
            await self._exchange(stream, bytes(data))

    async def _fds(self, rng, values) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.connect(self.socket_path)
        stream = trio.SocketStream(sock)
        async with stream:
            if rng.random() < 0.9:
                await stream.send_all(HELLO)
            for i in range(rng.randint(1, 10)):
                count = rng.choice([1, 1, 2, 3, 5, 253, 254, 600])
                passed = [rng.choice(self.fds) for _ in range(count)]
                shape = rng.choices(["right", "wrong", "other", "bytes"], [6, 2, 1, 1])[0]
                if shape == "right":
                    data = frame({"id": i + 1, "op": "blob_fds", "args": {"count": count}})
                elif shape == "wrong":
                    data = frame({"id": i + 1, "op": "blob_fds", "args": {"count": rng.choice([count + 1, count - 1,
                                                                                             values.anything()])}})
                elif shape == "other":
                    data = frame(values.request(i + 1))
                else:
                    data = rng.randbytes(rng.choice([1, 4, 100]))
                # A message carries at most 253 descriptors: the rest go with the frame's next bytes, one each.
                chunks = [passed[at:at + 253] for at in range(0, len(passed), 253)]
                try:
                    for at, part in enumerate(chunks):
                        piece = data[at:at + 1] if at < len(chunks) - 1 else data[at:]
                        if not piece:
                            break
                        sent = await sock.sendmsg([piece], [(trio.socket.SOL_SOCKET, trio.socket.SCM_RIGHTS,
                                                             array.array("i", part))])
                        if sent < len(piece):
                            await stream.send_all(piece[sent:])
                except OSError:
                    self.closed_by_agent += 1
                    return
                self.sent["fds"] += 1
            await self._exchange(stream, b"")

    async def _exchange(self, stream, data: bytes) -> None:
        """Send a batch, then ``status`` last, while reading the replies; the answer to ``status`` must come
        within ``HANG_SECONDS`` of the last byte sent. (Reading while sending matters: a client that only
        writes fills both socket buffers and then waits forever on an agent waiting for it to read.)"""
        async with trio.open_nursery() as nursery:
            async def read() -> None:
                await self._drain(stream, SENTINEL_ID, timeout=float("inf"))
                nursery.cancel_scope.cancel()

            nursery.start_soon(read)
            try:
                await stream.send_all(data + SENTINEL)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return   # the agent closed the connection (the reader sees it too)
            await trio.sleep(HANG_SECONDS)
            self.hangs.append(f"no answer to the sentinel status within {HANG_SECONDS:g} s")
            nursery.cancel_scope.cancel()

    async def _drain(self, stream, until_id, timeout: float = HANG_SECONDS) -> None:
        buffer = bytearray()
        with trio.move_on_after(timeout) as scope:
            while True:
                data = await stream.receive_some(1 << 20)
                if not data:
                    self.closed_by_agent += 1
                    return
                buffer += data
                while len(buffer) >= 4:
                    (length,) = struct.unpack_from(">I", buffer)
                    if len(buffer) < 4 + length:
                        break
                    message = msgpack.unpackb(bytes(buffer[4:4 + length]), raw=False, strict_map_key=False)
                    del buffer[:4 + length]
                    self._count(message)
                    if until_id is not None and message.get("id") == until_id and "ok" in message:
                        return
        if scope.cancelled_caught and until_id is not None:
            self.hangs.append(f"no answer to the sentinel status within {HANG_SECONDS:g} s")

    def _count(self, message: dict) -> None:
        if "item" in message:
            self.replies["stream_item"] += 1
        elif message.get("ok") is True:
            self.replies["ok"] += 1
            result = message.get("result")
            if isinstance(result, dict) and isinstance(result.get("run_id"), str) and len(self.run_ids) < 1000:
                self.run_ids.append(result["run_id"])
        elif message.get("ok") is False:
            self.replies[(message.get("error") or {}).get("code", "?")] += 1

    async def call(self, op: str, args: dict, timeout: float = HANG_SECONDS) -> dict:
        """One well-formed request on a connection of its own; its reply."""
        with trio.fail_after(timeout):
            stream = await self._connect()
            async with stream:
                await stream.send_all(HELLO + frame({"id": 1, "op": op, "args": args}))
                buffer = bytearray()
                while True:
                    data = await stream.receive_some(1 << 20)
                    if not data:
                        raise OSError(f"the agent closed the connection before answering {op}")
                    buffer += data
                    while len(buffer) >= 4 and len(buffer) >= 4 + struct.unpack_from(">I", buffer)[0]:
                        (length,) = struct.unpack_from(">I", buffer)
                        message = msgpack.unpackb(bytes(buffer[4:4 + length]), raw=False, strict_map_key=False)
                        del buffer[:4 + length]
                        if message.get("id") == 1:
                            return message

    async def quiet(self) -> dict:
        """Wait until no run the fuzzer submitted is queued or running and the MLflow mirror has caught up
        (at most ``QUIET_TIMEOUT``), then ``SETTLE_SECONDS``; what was still going on, and how long it took."""
        started = time.monotonic()
        while True:
            status = (await self.call("status", {})).get("result") or {}
            mirror = ((status.get("mlflow") or {}).get("mirror") or {})
            left = {"queued": status.get("queued"), "active": status.get("active"),
                    "mirror_backlog": mirror.get("backlog", 0)}
            if not any(left.values()) or time.monotonic() - started > QUIET_TIMEOUT:
                break
            await trio.sleep(1)
        await trio.sleep(SETTLE_SECONDS)
        return {**left, "waited_seconds": round(time.monotonic() - started, 1)}

    async def probe(self, process: subprocess.Popen) -> None:
        """Once a second, from its own connection: the agent is alive and answers ``status`` in time."""
        last_report = time.monotonic()
        while not self.done():
            if process.poll() is not None:
                return
            if time.monotonic() - last_report >= 30:
                last_report = time.monotonic()
                print(f"fuzz: {self.total:,} frames, agent RSS {rss_mib(process.pid):.1f} MiB", file=sys.stderr)
            try:
                with trio.fail_after(HANG_SECONDS):
                    stream = await self._connect()
                    async with stream:
                        await stream.send_all(HELLO + SENTINEL)
                        await self._drain(stream, SENTINEL_ID)
            except (trio.TooSlowError, OSError, trio.BrokenResourceError) as exc:
                self.hangs.append(f"status probe failed: {exc!r}")
                return
            await trio.sleep(1)


def anon_mib(pid: int) -> float:
    """The part of the RSS that is the process's own memory (not mapped files such as its libraries)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_agent(root: Path, config: str) -> tuple[subprocess.Popen, Path]:
    sock = root / "agent.sock"
    (root / "agent.toml").write_text(config)
    env = dict(os.environ, LABRUN_NO_AUTOSTART="1")
    log = open(root / "agent.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "labrun.agent", "--socket", str(sock), "--state-dir",
                                str(root / "state"), "--config", str(root / "agent.toml"), "--log-level", "warning"],
                               stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + 30
    while not socket_answers(sock):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the agent did not start:\n{(root / 'agent.log').read_text()}")
        time.sleep(0.05)
    return process, sock


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def fuzz(args, process: subprocess.Popen, sock: Path, fds: list[int]) -> dict:
    fuzzer = Fuzzer(str(sock), args.seed, min(args.warmup, args.frames), args.seconds, args.max_frame, fds)
    rss = {"launch": rss_mib(process.pid)}
    anon = {"launch": anon_mib(process.pid)}
    quiet = {}
    agent_fds = {"launch": open_fds(process.pid)}

    async def phase() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fuzzer.probe, process)
            for index in range(args.connections):
                nursery.start_soon(fuzzer.worker, index)

    async def reading(name: str) -> None:
        if process.poll() is None and not fuzzer.hangs:
            quiet[name] = await fuzzer.quiet()
            rss[name], anon[name] = rss_mib(process.pid), anon_mib(process.pid)
            agent_fds[name] = open_fds(process.pid)

    started = time.monotonic()
    # Warm-up: the MLflow UI and mirror on (see the docstring), then the same fuzzing as after it.
    ui = await fuzzer.call("ui", {"start": True, "timeout": 120.0}, timeout=180)
    mlflow_on = bool(ui.get("ok"))
    await phase()
    await reading("start")
    fuzzer.target = args.frames
    await phase()
    duration = time.monotonic() - started
    await reading("end")
    crashed = process.poll() is not None
    growth = (rss["end"] / rss["start"] - 1) if "end" in rss and "start" in rss else None
    return {
        "seed": args.seed, "frames": fuzzer.total, "by_kind": dict(fuzzer.sent), "replies": dict(fuzzer.replies),
        "connections_closed_by_agent": fuzzer.closed_by_agent, "runs_created": len(fuzzer.run_ids),
        "duration_seconds": round(duration, 1), "frames_per_second": round(fuzzer.total / duration),
        "crashes": int(crashed), "crash_exit": process.returncode, "hangs": fuzzer.hangs,
        "warmup_frames": min(args.warmup, args.frames), "mlflow_on": mlflow_on,
        "quiet_before_readings": quiet,
        "rss_mib": {k: round(v, 1) for k, v in rss.items()},
        "rss_anon_mib": {k: round(v, 1) for k, v in anon.items()},
        "rss_growth": None if growth is None else round(growth, 4),
        "agent_fds": agent_fds,
        "passed": not crashed and not fuzzer.hangs and growth is not None and growth <= 0.10
                  and agent_fds.get("end", math.inf) <= agent_fds.get("start", 0) + FD_SLACK,
    }


def markdown(result: dict) -> str:
    growth = "n/a" if result["rss_growth"] is None else f"{result['rss_growth']:+.1%}"
    waited = ", ".join(f"{name} {left['waited_seconds']} s" for name, left in result["quiet_before_readings"].items())
    lines = [
        "# Fuzzing a live agent",
        "",
        "`scripts/fuzz` (bench/fuzz.py): random bytes, truncated and oversized frames, random envelopes,",
        "well-formed requests of every op with random values for every argument, and open files passed with",
        "frames (SCM_RIGHTS), against one live `labrund`. Pass: 0 crashes, 0 hangs, agent RSS at the end within 10%",
        "of its RSS after warm-up, and no descriptors left open beyond a small slack. Both readings are",
        "taken quiet (fuzzing paused, the fuzzer's runs ended, the MLflow mirror caught up); see bench/fuzz.py.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| result | **{'PASS' if result['passed'] else 'FAIL'}** |",
        f"| seed | {result['seed']} |",
        f"| frames and requests sent | {result['frames']:,} |",
        f"| by kind | {', '.join(f'{k} {v:,}' for k, v in sorted(result['by_kind'].items()))} |",
        f"| replies | {', '.join(f'{k} {v:,}' for k, v in sorted(result['replies'].items()))} |",
        f"| connections closed by the agent | {result['connections_closed_by_agent']:,} |",
        f"| run ids met in replies (up to 1,000 kept to aim requests at) | {result['runs_created']:,} |",
        f"| duration | {result['duration_seconds']:,} s |",
        f"| rate | {result['frames_per_second']:,} frames/s |",
        f"| warm-up | {result['warmup_frames']:,} frames, MLflow UI and mirror "
        f"{'on' if result['mlflow_on'] else 'refused'} |",
        f"| waited for quiet (runs ended, mirror caught up) before the readings | {waited} |",
        f"| crashes | {result['crashes']} |",
        f"| hangs | {len(result['hangs'])} |",
        f"| agent RSS at launch / after warm-up / at the end | {result['rss_mib'].get('launch')} / "
        f"{result['rss_mib'].get('start')} / {result['rss_mib'].get('end')} MiB |",
        f"| RSS growth since warm-up | {growth} |",
        f"| agent's open descriptors at launch / after warm-up / at the end | {result['agent_fds'].get('launch')} / "
        f"{result['agent_fds'].get('start')} / {result['agent_fds'].get('end')} (pass: at most {FD_SLACK} more at "
        "the end than after warm-up) |",
        f"| of which anonymous memory (heap), at launch / after warm-up / at the end | "
        f"{result['rss_anon_mib'].get('launch')} / {result['rss_anon_mib'].get('start')} / "
        f"{result['rss_anon_mib'].get('end')} MiB |",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=float("inf"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=WARMUP_FRAMES, help="frames before the first memory reading")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--max-frame", type=int, default=1 << 20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--agent-log", type=Path, help="keep the agent's log here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="labrun-fuzz-") as tmp:
        root = Path(tmp)
        process, sock = start_agent(root, f"[agent]\nmax_frame_bytes = {args.max_frame}\n")
        try:
            result = trio.run(fuzz, args, process, sock, open_files(root))
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        if result["crashes"]:
            result["agent_log_tail"] = (root / "agent.log").read_text()[-4000:]
        if args.agent_log:
            args.agent_log.write_bytes((root / "agent.log").read_bytes())
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    if args.markdown:
        args.markdown.write_text(markdown(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
