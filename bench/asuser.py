"""What acting on a user's behalf costs: switching a thread's filesystem credentials, opening without
following links, and the worker-thread hop, next to a plain open. Needs root (it acts as ``nobody``).

Prints a Markdown table and writes it to ``bench/results/asuser.md``. Not a test: nothing is asserted.
"""

from __future__ import annotations

import os
import pwd
import platform
import sys
import tempfile
import time
from pathlib import Path

import trio

from labrun.agent import _asuser
from labrun.agent._asuser import Credentials, acting_as, open_beneath, open_directory, run_as

ROUNDS = 20_000
HOPS = 2_000


def per_call(fn, rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - start) / rounds * 1e6


def main() -> int:
    if os.geteuid() != 0:
        print("bench/asuser.py needs root: it switches to the user nobody", file=sys.stderr)
        return 1
    nobody = pwd.getpwnam("nobody")
    creds = Credentials.of(nobody.pw_uid, nobody.pw_gid)
    root = Path(tempfile.mkdtemp(prefix="labrun-bench-"))
    root.chmod(0o755)
    (root / "run").mkdir()
    (root / "run" / "logs").mkdir()
    (root / "run" / "logs" / "std_log.txt").write_text("x")
    for path in (root / "run", root / "run" / "logs", root / "run" / "logs" / "std_log.txt"):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    fd = open_directory(root / "run")
    rows = []

    def switch():
        with acting_as(creds):
            pass

    rows.append(("switch to the user and back (one thread)", per_call(switch, ROUNDS)))
    rows.append(("plain open + close", per_call(lambda: os.close(os.open(root / "run/logs/std_log.txt",
                                                                            os.O_RDONLY)), ROUNDS)))
    rows.append(("open beneath, openat2 (no link followed)",
                 per_call(lambda: os.close(open_beneath(fd, "logs/std_log.txt", os.O_RDONLY)), ROUNDS)))
    _asuser._openat2_missing = True
    rows.append(("open beneath, O_NOFOLLOW walk (old kernels)",
                 per_call(lambda: os.close(open_beneath(fd, "logs/std_log.txt", os.O_RDONLY)), ROUNDS)))
    _asuser._openat2_missing = False

    async def hops():
        start = time.perf_counter()
        for _ in range(HOPS):
            await run_as(creds, lambda: os.close(open_beneath(fd, "logs/std_log.txt", os.O_RDONLY)))
        return (time.perf_counter() - start) / HOPS * 1e6

    rows.append(("as the user on a worker thread (what a download's open costs)", trio.run(hops)))
    os.close(fd)
    table = ["| operation | µs per call |", "|---|---|"] + [f"| {name} | {value:.1f} |" for name, value in rows]
    text = (f"# Acting as a user\n\n{platform.machine()}, Linux {platform.release()}, Python "
            f"{platform.python_version()}, {os.cpu_count()} CPUs, measured with `bench/asuser.py` (on a machine shared with other work: "
            "read the ratios more than the absolute figures).\n\n"
            + "\n".join(table) + "\n")
    print(text)
    out = Path(__file__).parent / "results" / "asuser.md"
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
