"""The environment builder's per-recipe lock: one build of a recipe at a time, and no lock kept after it."""

import trio

from labrun.agent._environments import EnvironmentBuilder


async def test_builds_of_one_recipe_take_turns_and_leave_no_lock_behind(tmp_path):
    builder = EnvironmentBuilder(tmp_path)
    inside, most = [], []

    async def build(key):
        async with builder._building(key):
            inside.append(key)
            most.append(inside.count(key))
            await trio.sleep(0.01)
            inside.remove(key)

    async with trio.open_nursery() as nursery:
        for key in [(1000, "a")] * 3 + [(1000, "b"), (1001, "a")]:
            nursery.start_soon(build, key)
        await trio.sleep(0.005)
        assert set(builder._locks) == {(1000, "a"), (1000, "b"), (1001, "a")}
    assert max(most) == 1 and len(most) == 5
    assert builder._locks == {}
