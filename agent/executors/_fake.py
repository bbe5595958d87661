"""An in-memory executor for tests: runs are trio Events the test ends, on any clock.

``FakeMachine`` stands for the machine: its processes outlive any one ``FakeExecutor``,
so a test can stop a supervisor, build another with a new executor on the same machine,
and watch it recover (``Live``, ``Ended`` or ``Lost``, as the test left each process).
``stop`` takes ``grace`` seconds of the clock when the process ignores SIGTERM (the
default), so time limits and grace periods are measured under ``MockClock``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from ._base import Capabilities, Ended, Executor, ExitResult, Handle, LaunchSpec, Live, Lost, Recovery, StartFailed


@dataclass
class FakeProcess:
    pid: int
    launch: LaunchSpec
    done: trio.Event = field(default_factory=trio.Event)
    result: ExitResult | None = None


@dataclass
class FakeMachine:
    processes: dict[int, FakeProcess] = field(default_factory=dict)
    launches: list[LaunchSpec] = field(default_factory=list)
    stops: list[tuple[int, float, float]] = field(default_factory=list)   # (pid, grace, clock time)
    ignores_sigterm: bool = True
    fail_next: str | None = None   # the next start fails with this message
    next_pid: int = 1000

    def finish(self, pid: int, result: ExitResult = ExitResult(exit_code=0)) -> None:
        """End a process, as if it exited by itself."""
        process = self.processes[pid]
        process.result = result
        process.done.set()

    def vanish(self, pid: int) -> None:
        """The process is gone without a trace (a reboot)."""
        del self.processes[pid]

    def running(self) -> list[int]:
        return [pid for pid, p in self.processes.items() if not p.done.is_set()]


@dataclass(frozen=True)
class FakeHandle(Handle):
    kind = "fake"

    fake_pid: int

    @property
    def pid(self) -> int:
        return self.fake_pid


class FakeExecutor(Executor):
    """Registered under any kind (``kind``); every capability unless told otherwise."""

    handle_type = FakeHandle

    def __init__(self, machine: FakeMachine | None = None, *, kind: str = "local",
                 capabilities: Capabilities = Capabilities(gpus=True, distributed=True, outlives_agent=True)):
        self.machine = machine or FakeMachine()
        self.kind = kind
        self.capabilities = capabilities

    # Shortcuts to the machine, for tests that use one executor.
    @property
    def launches(self) -> list[LaunchSpec]:
        return self.machine.launches

    @property
    def stops(self) -> list[tuple[int, float, float]]:
        return self.machine.stops

    def finish(self, pid: int, result: ExitResult = ExitResult(exit_code=0)) -> None:
        self.machine.finish(pid, result)

    async def start(self, launch: LaunchSpec) -> FakeHandle:
        machine = self.machine
        if machine.fail_next is not None:
            message, machine.fail_next = machine.fail_next, None
            raise StartFailed(message)
        pid, machine.next_pid = machine.next_pid, machine.next_pid + 1
        machine.launches.append(launch)
        machine.processes[pid] = FakeProcess(pid, launch)
        return FakeHandle(fake_pid=pid)

    async def wait(self, handle: FakeHandle) -> ExitResult:
        process = self.machine.processes[handle.fake_pid]
        await process.done.wait()
        return process.result

    async def stop(self, handle: FakeHandle, grace: float) -> None:
        self.machine.stops.append((handle.fake_pid, grace, trio.current_time()))
        process = self.machine.processes.get(handle.fake_pid)
        if process is None or process.done.is_set():
            return
        if self.machine.ignores_sigterm:
            await trio.sleep(grace)
            self.machine.finish(handle.fake_pid, ExitResult(signal=9))
        else:
            self.machine.finish(handle.fake_pid, ExitResult(signal=15))

    async def recover(self, handle: FakeHandle) -> Recovery:
        process = self.machine.processes.get(handle.fake_pid)
        if process is None:
            return Lost("the process is gone")
        if process.done.is_set():
            return Ended(process.result)
        return Live(handle)
