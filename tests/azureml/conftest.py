"""This process keeps one connection per agent for the interactive runs it opens (as a user's interpreter
does, for its whole life). Each test's agents stop after it: their connections are closed first, so an
agent stops at once instead of waiting out its grace period for a client that is still connected."""

import pytest


@pytest.fixture
def make_agent(make_agent):
    yield make_agent
    from labrun import _hierarchy

    for connection in _hierarchy._BINDINGS.values():
        connection.close()
    _hierarchy._BINDINGS.clear()
