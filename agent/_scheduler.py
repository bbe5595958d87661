"""Which queued runs start now, and with which cores and GPUs. Pure: plain data in, plain data out.

Order: priority (higher first), then fair share (the user holding the smaller
dominant share of the machine right now goes first, recomputed after each start),
then submit order.

Backfill (EASY): the first run in that order that does not fit becomes the *head*
and gets a reservation: assuming every running run lasts its whole
``max_run_duration_seconds``, the head can start at the *shadow time*, using the
resources free then. A later run may start now only if it fits now and either ends
(by its own limit) before the shadow time or uses only what the head leaves spare at
the shadow time. So the head's earliest start never moves later, and a stream of
small runs cannot starve a big one.

Every run that does not start gets a reason: ``resources`` (does not fit now),
``reserved`` / ``priority`` / ``fair_share`` (fits, but would delay the head, which
is ahead of it by submit order / priority / fair share), ``max_concurrent``,
``dependency`` (a run it waits for has not ended: the caller says which in
``Pending.blocked_by``), ``array_limit`` (its array already runs as many runs as its
``%N`` allows: ``array_limits``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Demand:
    cpus: int = 1
    memory: int | None = None   # bytes
    gpus: int = 0


@dataclass(frozen=True, slots=True)
class Pending:
    run_id: str
    user: str
    priority: int
    order: int                  # submit order
    demand: Demand
    duration: float             # max_run_duration_seconds
    blocked_by: tuple[str, ...] = ()   # runs it waits for that have not ended yet
    array: str | None = None           # the array it belongs to


@dataclass(frozen=True, slots=True)
class Allocation:
    cpus: int
    memory: int | None
    gpus: tuple[str, ...] = ()
    cores: tuple[int, ...] = ()  # empty when the agent does not pin cores

    def to_wire(self) -> dict:
        return {"cpus": self.cpus, "memory": self.memory, "gpus": list(self.gpus), "cores": list(self.cores)}

    @classmethod
    def from_wire(cls, data: dict) -> "Allocation":
        return cls(cpus=data["cpus"], memory=data.get("memory"), gpus=tuple(data.get("gpus", ())),
                   cores=tuple(data.get("cores", ())))


@dataclass(frozen=True, slots=True)
class Active:
    run_id: str
    user: str
    allocation: Allocation
    ends_by: float              # start + max_run_duration_seconds
    array: str | None = None


@dataclass(frozen=True, slots=True)
class Capacity:
    cpus: int
    memory: int | None = None
    gpus: tuple[str, ...] = ()
    cores: tuple[int, ...] = ()  # the core ids to pin to; empty: no pinning
    max_runs: int = 0            # 0: no limit

    def fits_ever(self, demand: Demand) -> str | None:
        """Why ``demand`` can never fit this machine, or None."""
        if demand.cpus > self.cpus:
            return f"asks for {demand.cpus} CPUs but the agent has {self.cpus}"
        if demand.gpus > len(self.gpus):
            return f"asks for {demand.gpus} GPUs but the agent has {len(self.gpus)}"
        if demand.memory is not None and self.memory is not None and demand.memory > self.memory:
            return f"asks for {demand.memory} bytes of memory but the agent has {self.memory}"
        return None


@dataclass(frozen=True, slots=True)
class Start:
    run_id: str
    allocation: Allocation


@dataclass
class Decision:
    starts: list[Start] = field(default_factory=list)
    waiting: dict[str, tuple[str, int]] = field(default_factory=dict)   # run_id -> (reason, position)
    order: list[str] = field(default_factory=list)                     # every run, in the order considered
    # False when the pass stopped once nothing more could start (``schedule(explain=False)``): ``waiting``
    # and ``order`` then cover only the runs considered until then.
    explained: bool = True


@dataclass
class _Free:
    cpus: int
    memory: int | None
    gpus: list[str]
    cores: list[int]

    def fits(self, d: Demand) -> bool:
        return (d.cpus <= self.cpus and d.gpus <= len(self.gpus)
                and (d.memory is None or self.memory is None or d.memory <= self.memory))

    def take(self, d: Demand, pin: bool) -> Allocation:
        gpus, self.gpus = tuple(self.gpus[:d.gpus]), self.gpus[d.gpus:]
        cores = ()
        if pin:
            cores, self.cores = tuple(self.cores[:d.cpus]), self.cores[d.cpus:]
        self.cpus -= d.cpus
        if self.memory is not None and d.memory is not None:
            self.memory -= d.memory
        return Allocation(cpus=d.cpus, memory=d.memory, gpus=gpus, cores=cores)


def _free_now(capacity: Capacity, active: list[Active]) -> _Free:
    used_gpus = {g for a in active for g in a.allocation.gpus}
    used_cores = {c for a in active for c in a.allocation.cores}
    memory = capacity.memory
    if memory is not None:
        memory -= sum(a.allocation.memory or 0 for a in active)
    return _Free(
        cpus=capacity.cpus - sum(a.allocation.cpus for a in active),
        memory=memory,
        gpus=[g for g in capacity.gpus if g not in used_gpus],
        cores=[c for c in capacity.cores if c not in used_cores],
    )


def _share(capacity: Capacity, cpus: int, memory: int, gpus: int) -> float:
    shares = [cpus / capacity.cpus]
    if capacity.gpus:
        shares.append(gpus / len(capacity.gpus))
    if capacity.memory:
        shares.append(memory / capacity.memory)
    return max(shares)


@dataclass
class _Shadow:
    """The head's reservation: when it can start, and what it leaves spare then."""

    time: float
    spare_cpus: int
    spare_memory: int | None
    spare_gpus: int


def _reserve(head: Pending, free: _Free, active: list[Active], now: float) -> _Shadow:
    cpus, gpus, memory = free.cpus, len(free.gpus), free.memory
    d = head.demand
    when = now
    for run in sorted(active, key=lambda a: a.ends_by):
        if cpus >= d.cpus and gpus >= d.gpus and (d.memory is None or memory is None or memory >= d.memory):
            break
        when = max(when, run.ends_by)
        cpus += run.allocation.cpus
        gpus += len(run.allocation.gpus)
        if memory is not None:
            memory += run.allocation.memory or 0
    spare_memory = None if memory is None else memory - (d.memory or 0)
    return _Shadow(time=when, spare_cpus=cpus - d.cpus, spare_memory=spare_memory, spare_gpus=gpus - d.gpus)


def schedule(pending: list[Pending], active: list[Active], capacity: Capacity, now: float,
             array_limits: dict[str, int] | None = None, *, explain: bool = True) -> Decision:
    """Decide which of ``pending`` start now. Deterministic for equal inputs.

    ``array_limits``: the most runs of each array that may be active at once (absent or 0: no limit).
    ``explain``: say why every other run waits; without it, the pass stops once no run can start any
    more (every CPU or the run cap taken), so that a pass over a long queue costs what it starts.
    """
    decision = Decision()
    array_limits = array_limits or {}
    array_active: dict[str, int] = defaultdict(int)
    for a in active:
        if a.array is not None:
            array_active[a.array] += 1
    free = _free_now(capacity, active)
    pin = bool(capacity.cores)
    # A run that takes nothing from this machine (it runs on a cluster) is not one of its concurrent runs.
    running = sum(1 for a in active if a.allocation.cpus)

    usage: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for a in active:
        u = usage[a.user]
        u[0] += a.allocation.cpus
        u[1] += a.allocation.memory or 0
        u[2] += len(a.allocation.gpus)

    # Per priority level, one FIFO per user; the head of the user with the least share goes next.
    levels: dict[int, dict[str, list[Pending]]] = defaultdict(lambda: defaultdict(list))
    for p in sorted(pending, key=lambda p: p.order, reverse=True):
        levels[p.priority][p.user].append(p)   # reversed, so pop() yields the oldest

    head: Pending | None = None
    shadow: _Shadow | None = None
    started: list[Active] = []   # this pass's starts: they end (and free resources) too
    # Runs that take no CPU here (a cluster's) may start on a full machine: then every run is looked at.
    may_stop = not explain and all(p.demand.cpus for p in pending)
    for priority in sorted(levels, reverse=True):
        queues = levels[priority]
        while queues:
            if may_stop and (free.cpus <= 0 or (capacity.max_runs and running >= capacity.max_runs)):
                decision.explained = False
                return decision
            user = min(queues, key=lambda u: (_share(capacity, *usage[u]), queues[u][-1].order))
            run = queues[user].pop()
            if not queues[user]:
                del queues[user]
            # A waiting run's position counts only the runs still waiting ahead of it.
            position = len(decision.waiting) + 1
            decision.order.append(run.run_id)
            d = run.demand
            # Runs that may not start whatever the resources never become the head: they reserve nothing.
            if run.blocked_by:
                decision.waiting[run.run_id] = ("dependency", position)
                continue
            if run.array is not None and 0 < array_limits.get(run.array, 0) <= array_active[run.array]:
                decision.waiting[run.run_id] = ("array_limit", position)
                continue
            if capacity.fits_ever(d) is not None:
                decision.waiting[run.run_id] = ("resources", position)
                continue
            if capacity.max_runs and running >= capacity.max_runs and d.cpus:
                decision.waiting[run.run_id] = ("max_concurrent", position)
                continue
            if not free.fits(d):
                decision.waiting[run.run_id] = ("resources", position)
                if head is None:
                    head, shadow = run, _reserve(run, free, active + started, now)
                continue
            if head is not None:
                ends_before = now + run.duration <= shadow.time
                within_spare = (d.cpus <= shadow.spare_cpus and d.gpus <= shadow.spare_gpus
                                and (d.memory is None or shadow.spare_memory is None
                                     or d.memory <= shadow.spare_memory))
                if not ends_before and not within_spare:
                    if head.priority > run.priority:
                        reason = "priority"
                    elif head.order > run.order:
                        reason = "fair_share"
                    else:
                        reason = "reserved"
                    decision.waiting[run.run_id] = (reason, position)
                    continue
                if not ends_before:
                    shadow.spare_cpus -= d.cpus
                    shadow.spare_gpus -= d.gpus
                    if shadow.spare_memory is not None and d.memory is not None:
                        shadow.spare_memory -= d.memory
            allocation = free.take(d, pin)
            decision.starts.append(Start(run.run_id, allocation))
            started.append(Active(run.run_id, run.user, allocation, now + run.duration, run.array))
            running += 1 if d.cpus else 0
            if run.array is not None:
                array_active[run.array] += 1
            u = usage[run.user]
            u[0] += d.cpus
            u[1] += d.memory or 0
            u[2] += d.gpus
    return decision
