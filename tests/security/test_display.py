"""Control characters in what other users name and tag never reach a terminal raw (issue item 11)."""

from __future__ import annotations

import pytest

from labrun.cli._format import escape, table

pytestmark = pytest.mark.slow

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\rfake\x9b31m\u202e"


def test_escape_makes_every_control_character_visible():
    shown = escape(HOSTILE)
    assert shown == "\\e]0;pwned\\x07\\e[2J\\rfake\\x9b31m\\u202e"
    assert all(c.isprintable() for c in shown)
    assert escape("plain text, ünïcode") == "plain text, ünïcode"
    assert all(c.isprintable() or c == "\n" for c in table(["A"], [[HOSTILE]]))


def test_show_and_ls_escape_other_users_labels(clients, shared_source, root_agent):
    alice, bob = clients["alice"], clients["bob"]
    run_id = alice.json(f"""
from labrun import Experiment, ScriptRunConfig
run = Experiment(ws, "sec").submit(ScriptRunConfig({str(shared_source)!r}, command=["true"]),
                                   tags={{{HOSTILE!r}: {HOSTILE!r}}})
run.wait_for_completion()
ws._call("set_labels", run_id=run.id, kind="tags", values={{"later": {HOSTILE!r}}})
out(run.id)
""")
    for args in (["show", run_id], ["ls", "--all"]):
        result = bob.cli(*args)
        assert result.returncode == 0, result.stderr
        assert all(c.isprintable() or c == "\n" for c in result.stdout), (args, result.stdout)
    shown = bob.cli("show", run_id).stdout
    assert "\\e]0;pwned\\x07" in shown and "later=" in shown
