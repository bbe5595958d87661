"""The scheduler is pure: these properties hold for any queue, running set and capacity."""

from collections import Counter

from hypothesis import given, settings, strategies as st

from labrun.agent._scheduler import Active, Allocation, Capacity, Demand, Pending, schedule

GIB = 1 << 30


def cap(cpus=4, memory=16 * GIB, gpus=("0", "1"), pin=True, max_runs=0):
    return Capacity(cpus=cpus, memory=memory, gpus=tuple(gpus), cores=tuple(range(cpus)) if pin else (),
                    max_runs=max_runs)


def run(i, user="alice", priority=0, cpus=1, memory=None, gpus=0, duration=3600):
    return Pending(f"r{i}", user, priority, i, Demand(cpus, memory, gpus), duration)


def started(decision):
    return [s.run_id for s in decision.starts]


class TestOrder:
    def test_fifo_within_a_user(self):
        d = schedule([run(3), run(1), run(2)], [], cap(cpus=2), 0)
        assert started(d) == ["r1", "r2"]
        assert d.waiting["r3"] == ("resources", 1)

    def test_priority_first(self):
        d = schedule([run(1), run(2, priority=5)], [], cap(cpus=1), 0)
        assert started(d) == ["r2"]

    def test_fair_share_alternates_users(self):
        queue = [run(1, "alice"), run(2, "alice"), run(3, "alice"), run(4, "bob")]
        d = schedule(queue, [], cap(cpus=2), 0)
        assert started(d) == ["r1", "r4"]

    def test_user_with_less_in_use_goes_first(self):
        busy = Active("x", "alice", Allocation(cpus=2, memory=None), ends_by=100)
        d = schedule([run(1, "alice"), run(2, "bob")], [busy], cap(cpus=3), 0)
        assert started(d) == ["r2"]

    def test_gpus_are_distinct_devices(self):
        d = schedule([run(1, gpus=1), run(2, gpus=1), run(3, gpus=1)], [], cap(), 0)
        assert [s.allocation.gpus for s in d.starts] == [("0",), ("1",)]
        assert d.waiting["r3"][0] == "resources"

    def test_cores_are_pinned_and_distinct(self):
        d = schedule([run(1, cpus=2), run(2, cpus=2)], [], cap(cpus=4), 0)
        assert [s.allocation.cores for s in d.starts] == [(0, 1), (2, 3)]

    def test_max_concurrent(self):
        d = schedule([run(1), run(2)], [], cap(max_runs=1), 0)
        assert started(d) == ["r1"] and d.waiting["r2"][0] == "max_concurrent"


class TestBackfill:
    def test_short_run_backfills_before_the_head(self):
        """The head needs all 3 GPUs, one is busy for 100 s: a 50-s run may use a free GPU, a 200-s run may not."""
        busy = Active("x", "carol", Allocation(cpus=1, memory=None, gpus=("0",)), ends_by=100)
        queue = [run(1, gpus=3), run(2, gpus=1, duration=50), run(3, gpus=1, duration=200)]
        d = schedule(queue, [busy], cap(gpus=("0", "1", "2")), 0)
        assert started(d) == ["r2"]
        assert d.waiting["r1"][0] == "resources"
        assert d.waiting["r3"][0] == "reserved"

    def test_backfill_within_spare_resources(self):
        """A long run may still start if it uses only what the head leaves spare."""
        busy = Active("x", "carol", Allocation(cpus=6, memory=None), ends_by=100)
        queue = [run(1, cpus=4), run(2, cpus=1, duration=10**6)]
        d = schedule(queue, [busy], cap(cpus=8), 0)
        assert started(d) == ["r2"]  # 8 cpus at t=100: head takes 4, one spare is ours

    def test_waiting_reason_priority(self):
        busy = Active("x", "carol", Allocation(cpus=2, memory=None), ends_by=100)
        d = schedule([run(1, priority=9, cpus=4), run(2, duration=10**6)], [busy], cap(cpus=4), 0)
        assert started(d) == [] and d.waiting["r2"][0] == "priority"

    def test_runs_started_in_the_same_pass_count_for_the_reservation(self):
        """Found by the property below: the head's start is when a run started moments ago frees its CPU."""
        busy = Active("x", "a", Allocation(cpus=4, memory=None), ends_by=2)
        queue = [run(9, priority=1, duration=1), run(10, priority=1, cpus=3, duration=1), run(1, duration=2)]
        d = schedule(queue, [busy], cap(cpus=7, gpus=(), pin=False), 0)
        assert started(d) == ["r9"] and d.waiting["r1"][0] == "priority"

    def test_request_larger_than_machine_never_blocks_others(self):
        d = schedule([run(1, cpus=99), run(2)], [], cap(), 0)
        assert started(d) == ["r2"] and d.waiting["r1"][0] == "resources"


# -- properties ------------------------------------------------------------------------

demands = st.builds(Demand, cpus=st.integers(1, 4), memory=st.none() | st.integers(1, 8).map(lambda g: g * GIB),
                    gpus=st.integers(0, 2))
capacities = st.builds(lambda cpus, mem, gpus, pin, max_runs: cap(cpus, mem, [str(i) for i in range(gpus)], pin, max_runs),
                       st.integers(1, 8), st.none() | st.integers(1, 32).map(lambda g: g * GIB),
                       st.integers(0, 4), st.booleans(), st.integers(0, 3))


@st.composite
def situations(draw):
    capacity = draw(capacities)
    # Running runs: a valid allocation carved from the capacity.
    pending = draw(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(-2, 2), demands,
                                      st.integers(1, 1000)), max_size=12))
    queue = [Pending(f"q{i}", u, p, i, d, dur) for i, (u, p, d, dur) in enumerate(pending)]
    seed = draw(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), demands, st.integers(1, 1000)), max_size=5))
    pre = schedule([Pending(f"s{i}", u, 0, i, d, dur) for i, (u, d, dur) in enumerate(seed)], [],
                   Capacity(capacity.cpus, capacity.memory, capacity.gpus, capacity.cores), 0)
    active = [Active(s.run_id, seed[int(s.run_id[1:])][0], s.allocation, seed[int(s.run_id[1:])][2])
              for s in pre.starts]
    return queue, active, capacity


@settings(max_examples=400)
@given(situations())
def test_never_over_allocates(situation):
    queue, active, capacity = situation
    d = schedule(queue, active, capacity, 0)
    allocations = [a.allocation for a in active] + [s.allocation for s in d.starts]
    assert sum(a.cpus for a in allocations) <= capacity.cpus
    if capacity.memory is not None:
        assert sum(a.memory or 0 for a in allocations) <= capacity.memory
    gpus = Counter(g for a in allocations for g in a.gpus)
    assert all(n == 1 for n in gpus.values()) and set(gpus) <= set(capacity.gpus)
    cores = Counter(c for a in allocations for c in a.cores)
    assert all(n == 1 for n in cores.values())
    if capacity.max_runs:
        assert len(allocations) <= max(capacity.max_runs, len(active))
    by_id = {p.run_id: p for p in queue}
    for s in d.starts:
        assert s.allocation.cpus == by_id[s.run_id].demand.cpus
        assert len(s.allocation.gpus) == by_id[s.run_id].demand.gpus
    assert set(d.waiting) | {s.run_id for s in d.starts} == set(by_id)


@settings(max_examples=400)
@given(situations())
def test_a_pass_that_stops_early_starts_exactly_what_a_full_pass_starts(situation):
    """Without reasons, a pass stops once the machine is full: the same starts, the reasons of the runs it
    looked at, and it says whether it looked at them all."""
    queue, active, capacity = situation
    full = schedule(queue, active, capacity, 0)
    quick = schedule(queue, active, capacity, 0, explain=False)
    assert quick.starts == full.starts
    assert quick.waiting.items() <= full.waiting.items()
    assert quick.explained == (quick.waiting == full.waiting)


def test_a_long_queue_on_a_full_machine_is_not_walked_through():
    queue = [run(i) for i in range(1000)]
    d = schedule(queue, [], cap(cpus=2, max_runs=2), 0, explain=False)
    assert started(d) == ["r0", "r1"] and not d.explained and len(d.waiting) == 0


@settings(max_examples=400)
@given(situations())
def test_idle_machine_makes_progress(situation):
    """With nothing running, some run starts if any run fits the machine at all."""
    queue, _, capacity = situation
    d = schedule(queue, [], capacity, 0)
    if any(capacity.fits_ever(p.demand) is None for p in queue):
        assert d.starts


def _fits_at(time, demand, running, capacity):
    alive = [a for a in running if a.ends_by > time]
    cpus = capacity.cpus - sum(a.allocation.cpus for a in alive)
    gpus = len(capacity.gpus) - sum(len(a.allocation.gpus) for a in alive)
    memory_ok = demand.memory is None or capacity.memory is None or \
        capacity.memory - sum(a.allocation.memory or 0 for a in alive) >= demand.memory
    return cpus >= demand.cpus and gpus >= demand.gpus and memory_ok


@settings(max_examples=400)
@given(situations())
def test_backfill_never_delays_the_head(situation):
    """Runs started past the first blocked run (the head) leave the head's earliest start where it was."""
    queue, active, capacity = situation
    now = 0
    d = schedule(queue, active, capacity, now)
    by_id = {p.run_id: p for p in queue}
    head_id = next((rid for rid in d.order if d.waiting.get(rid, ("",))[0] == "resources"
                    and capacity.fits_ever(by_id[rid].demand) is None), None)
    if head_id is None or capacity.max_runs:
        return
    head = by_id[head_id]
    index = d.order.index(head_id)
    started = {s.run_id: s.allocation for s in d.starts}
    as_active = {rid: Active(rid, by_id[rid].user, alloc, now + by_id[rid].duration) for rid, alloc in started.items()}
    before = active + [as_active[rid] for rid in d.order[:index] if rid in started]
    after = before + [as_active[rid] for rid in d.order[index + 1:] if rid in started]
    times = sorted({now, *(a.ends_by for a in before)})
    shadow = next(t for t in times if _fits_at(t, head.demand, before, capacity))
    assert _fits_at(shadow, head.demand, after, capacity)


def test_runs_that_take_nothing_here_are_not_concurrent_runs_of_this_machine():
    """A cluster's runs (zero local demand) neither count toward max_concurrent_runs nor wait for it."""
    capacity = Capacity(cpus=4, memory=None, gpus=(), max_runs=1)
    cluster = Allocation(cpus=0, memory=None)
    active = [Active("remote", "a", cluster, 100.0)]
    pending = [Pending("local", "a", 0, 1, Demand(cpus=1), 10.0), Pending("local2", "a", 0, 2, Demand(cpus=1), 10.0),
               Pending("remote2", "a", 0, 3, Demand(cpus=0), 10.0)]
    decision = schedule(pending, active, capacity, 0.0)
    assert sorted(s.run_id for s in decision.starts) == ["local", "remote2"]
    assert decision.waiting["local2"][0] == "max_concurrent"


class TestDependenciesAndArrays:
    def test_a_blocked_run_waits_and_reserves_nothing(self):
        blocked = Pending("r1", "alice", 0, 1, Demand(cpus=4), 3600, blocked_by=("r0",))
        d = schedule([blocked, run(2, cpus=4)], [], cap(cpus=4), 0)
        assert started(d) == ["r2"]
        assert d.waiting["r1"] == ("dependency", 1)

    def test_array_limit_counts_active_and_this_pass(self):
        members = [Pending(f"a{i}", "alice", 0, i, Demand(), 3600, array="A") for i in range(5)]
        d = schedule(members, [], cap(cpus=4), 0, array_limits={"A": 2})
        assert started(d) == ["a0", "a1"]
        assert {d.waiting[f"a{i}"][0] for i in (2, 3, 4)} == {"array_limit"}
        running = Active("a0", "alice", Allocation(cpus=1, memory=None), 100, array="A")
        d = schedule(members[1:], [running], cap(cpus=4), 0, array_limits={"A": 2})
        assert started(d) == ["a1"]

    def test_a_throttled_array_lets_other_runs_through(self):
        members = [Pending(f"a{i}", "alice", 0, i, Demand(), 3600, array="A") for i in range(3)]
        d = schedule([*members, run(9)], [], cap(cpus=4), 0, array_limits={"A": 1})
        assert started(d) == ["a0", "r9"]

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 2), st.booleans()), max_size=12), st.integers(1, 3), st.integers(1, 6))
    def test_never_more_than_the_limit(self, shape, limit, cpus):
        pending = [Pending(f"r{i}", "alice", 0, i, Demand(), 60, blocked_by=("x",) if blocked else (),
                           array=f"A{group}") for i, (group, blocked) in enumerate(shape)]
        d = schedule(pending, [], cap(cpus=cpus, gpus=()), 0, array_limits={f"A{g}": limit for g in range(3)})
        per_array = Counter(next(p.array for p in pending if p.run_id == s.run_id) for s in d.starts)
        assert all(count <= limit for count in per_array.values())
        assert not {s.run_id for s in d.starts} & {p.run_id for p in pending if p.blocked_by}
