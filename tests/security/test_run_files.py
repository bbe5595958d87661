"""Attacks through a run's files, against a real root agent, by real users (issue items 1 and 2)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from tests.security.conftest import assert_still_serving

pytestmark = pytest.mark.slow

BAD_NAMES = ["user_logs//etc/shadow", "outputs//etc/shadow", "/etc/shadow", "outputs/../../../../etc/shadow",
             "user_logs/../../../../etc/shadow", "artifacts//etc/passwd", "outputs/./x", "outputs/a\0b", "x/../y"]


def _victim(scratch: Path, name: str, text: str, mode: int) -> tuple[Path, tuple]:
    """A root-owned file a user must never get the agent to read, write or chown; and its fingerprint."""
    victim = scratch / name
    victim.write_text(text)
    victim.chmod(mode)
    return victim, _digest(str(victim))


def _digest(path: str) -> tuple:
    info = os.stat(path)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest(), info.st_uid, info.st_mode, info.st_mtime_ns


def test_names_that_leave_the_run_are_refused_by_every_op(clients, shared_source, root_agent):
    alice = clients["alice"]
    run_id = alice.submit(shared_source, ["sh", "-c", "echo hi > outputs/ok.txt"])
    assert alice.wait(run_id)["status"] == "Completed"
    before = {path: _digest(path) for path in ("/etc/shadow", "/etc/passwd")}
    results = alice.json(f"""
names = {BAD_NAMES!r}
run_id = {run_id!r}
found = {{}}
for name in names:
    found["download " + name] = stream("download", run_id=run_id, name=name)
    found["put " + name] = call("put_file", run_id=run_id, name=name, data=b"pwned", append=True)
    found["logs " + name] = stream("logs", run_id=run_id, name=name)
    found["put cron " + name] = call("put_file", run_id=run_id, name="outputs//etc/cron.d/lrsec", data=b"x",
                                     append=False)
out(found)
""")
    resumed = alice.json(f"""
from labrun import DataPath, Experiment, ScriptRunConfig
from labrun.exceptions import BadRequest
class Source: id = {run_id!r}
refused = []
for name in {BAD_NAMES!r}:
    try:
        Experiment(ws, "sec").submit(ScriptRunConfig({str(shared_source)!r}, command=["true"],
                                                     resume_from=DataPath.from_run(Source(), name)))
        refused.append("accepted " + name)
    except BadRequest as exc:
        refused.append(str(exc))
out(refused)
""")
    assert all("resume_from" in message for message in resumed), resumed
    for op, result in results.items():
        assert result.get("error") == "bad_request", (op, result)
        assert any(why in result["message"] for why in ("file name", "must be a path inside", "kept by the agent",
                                                        "NUL")), \
            (op, result)
    assert {path: _digest(path) for path in before} == before
    assert not os.path.exists("/etc/cron.d/lrsec")
    # The good name still works, and the agent serves everyone.
    assert alice.json(f"out(stream('download', run_id={run_id!r}, name='outputs/ok.txt'))")["ok"][0]["data"] == "hi\n"
    assert_still_serving(clients["bob"], shared_source)


def test_links_a_run_plants_are_never_followed(clients, shared_source, root_agent, scratch):
    alice = clients["alice"]
    victim, before = _victim(scratch, "victim", "root's file\n", 0o644)
    plant = ("ln -s /etc/shadow outputs/shadow && ln -s /etc outputs/etc && ln -s ../train.py outputs/inside && "
             f"ln -s {victim} outputs/victim && mkdir outputs/real && echo real > outputs/real/file && "
             "ln -s real outputs/dirlink")
    run_id = alice.submit(shared_source, ["sh", "-c", plant])
    assert alice.wait(run_id)["status"] == "Completed"
    results = alice.json(f"""
run_id = {run_id!r}
found = {{}}
for name in ["outputs/shadow", "outputs/etc/shadow", "outputs/inside", "outputs/victim", "outputs/dirlink/file"]:
    found["download " + name] = stream("download", run_id=run_id, name=name)
for name in ["outputs/victim", "outputs/shadow", "outputs/etc/cron.d/lrsec", "outputs/dirlink/new"]:
    found["append " + name] = call("put_file", run_id=run_id, name=name, data=b"pwned", append=True)
found["files"] = call("files", run_id=run_id)
found["real"] = stream("download", run_id=run_id, name="outputs/real/file")
out(found)
""")
    files = results.pop("files")["ok"]
    real = results.pop("real")["ok"]
    for op, result in results.items():
        assert result.get("error") == "bad_request" and "symbolic link" in result["message"], (op, result)
    assert real[0]["data"] == "real\n"
    # Links are not listed as files; the real file is.
    assert [f["name"] for f in files if f["name"].startswith("outputs/")] == ["outputs/real/file"]
    assert _digest(str(victim)) == before and not os.path.exists("/etc/cron.d/lrsec")
    assert_still_serving(clients["bob"], shared_source)


def test_outputs_replaced_by_a_link_to_a_directory(clients, shared_source, root_agent):
    alice = clients["alice"]
    run_id = alice.submit(shared_source, ["sh", "-c", "rmdir outputs && ln -s /etc outputs"])
    assert alice.wait(run_id)["status"] == "Completed"
    results = alice.json(f"""
out([stream("download", run_id={run_id!r}, name="outputs/shadow"),
     call("put_file", run_id={run_id!r}, name="outputs/lrsec", data=b"x", append=False)])
""")
    for result in results:
        assert result.get("error") == "bad_request" and "symbolic link" in result["message"], result
    assert not os.path.exists("/etc/lrsec")


def _wait_for(client, run_id: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.json(f"out(ws._call('get', run_id={run_id!r})['status'])") != status:
        assert time.monotonic() < deadline, f"{run_id} never became {status}"
        time.sleep(0.2)


def test_logs_swapped_for_links_while_queued_are_not_appended_or_chowned(clients, shared_source, root_agent,
                                                                         scratch):
    alice = clients["alice"]
    victim, before = _victim(scratch, "victim-log", "root's\n", 0o644)
    victim_dir = scratch / "victim-dir"
    victim_dir.mkdir(mode=0o755)
    # The blocker holds both cores, so the next runs wait in the queue.
    blocker = alice.submit(shared_source, ["sleep", "60"], resources={"cpus": 2})
    _wait_for(alice, blocker, "Running")
    file_swap = alice.submit(shared_source, ["echo", "late"])
    dir_swap = alice.submit(shared_source, ["echo", "late"])
    runs = root_agent.state_dir / "runs"
    swap = alice.run(f"""
import os
os.symlink({str(victim)!r}, {str(runs / file_swap / "logs" / "std_log.txt")!r})
os.rmdir({str(runs / dir_swap / "logs")!r})
os.symlink({str(victim_dir)!r}, {str(runs / dir_swap / "logs")!r})
""", prelude=False)
    assert swap.returncode == 0, swap.stderr
    assert alice.json(f"out(call('cancel', run_id={blocker!r})['ok']['status'])") in ("CancelRequested", "Canceled")
    for run_id in (file_swap, dir_swap):
        details = alice.wait(run_id)
        assert details["status"] == "Failed" and "cannot create the run's logs" in details["error"], details
    assert _digest(str(victim)) == before and victim.stat().st_uid == 0
    assert list(victim_dir.iterdir()) == [] and victim_dir.stat().st_uid == 0
    assert_still_serving(clients["bob"], shared_source)


def test_other_users_cannot_touch_a_run(clients, shared_source, root_agent):
    alice, bob = clients["alice"], clients["bob"]
    run_id = alice.json(f"""
from labrun import Experiment, ScriptRunConfig
config = ScriptRunConfig({str(shared_source)!r}, command=["sleep", "60"])
config.run_config.environment_variables = {{"SECRET_TOKEN": "alice-secret"}}
run = Experiment(ws, 'sec').submit(config)
out(run.id)
""")
    results = bob.json(f"""
run_id = {run_id!r}
out({{
    "get": call("get", run_id=run_id),
    "wait": call("wait", run_id=run_id, timeout=0),
    "cancel": call("cancel", run_id=run_id),
    "logs": stream("logs", run_id=run_id),
    "files": call("files", run_id=run_id),
    "download": stream("download", run_id=run_id, name="user_logs/std_log.txt"),
    "get_metrics": call("get_metrics", run_id=run_id),
    "put_file": call("put_file", run_id=run_id, name="outputs/x", data=b"x"),
    "put_file token": call("put_file", run_id=run_id, token="guess", name="outputs/x", data=b"x"),
    "set_labels": call("set_labels", run_id=run_id, kind="tags", values={{"x": "y"}}),
    "set_labels token": call("set_labels", run_id=run_id, token="guess", kind="tags", values={{"x": "y"}}),
    "log_metrics": call("log_metrics", run_id=run_id, metrics=[]),
    "log_metrics token": call("log_metrics", run_id=run_id, token="guess", metrics=[]),
}})
""")
    shown = results.pop("get")["ok"]
    assert shown["user"] == "lrsec-alice" and "environment_variables" not in shown
    assert "alice-secret" not in str(results.pop("wait"))
    for op, result in results.items():
        assert result.get("error") == "forbidden", (op, result)
        assert "lrsec-alice" in result["message"] or "token is not valid" in result["message"], (op, result)
    # resume_from another user's run is refused at submit.
    resumed = bob.json(f"""
from labrun import DataPath, Experiment, ScriptRunConfig
from labrun.exceptions import Forbidden
class Source: id = {run_id!r}
try:
    Experiment(ws, 'sec').submit(ScriptRunConfig({str(shared_source)!r}, command=["true"],
                                                 resume_from=DataPath.from_run(Source(), "outputs/x")))
    out("accepted")
except Forbidden as exc:
    out(str(exc))
""")
    assert "belongs to lrsec-alice" in resumed
    # The admin may do what the owner may.
    admin = clients["admin"].json(f"out([call('get', run_id={run_id!r})['ok'].get('environment_variables'), "
                                  f"call('cancel', run_id={run_id!r})['ok']['status']])")
    assert admin[0] == {"SECRET_TOKEN": "alice-secret"} and admin[1] in ("CancelRequested", "Canceled")
    assert_still_serving(bob, shared_source)


def test_a_source_with_an_outputs_file_is_a_clear_error(clients, shared_tmp):
    source = shared_tmp("outputs-file")
    (source / "outputs").write_text("not a directory\n")
    (source / "outputs").chmod(0o644)
    result = clients["alice"].json(f"""
from labrun import Experiment, ScriptRunConfig
from labrun.exceptions import BadRequest
try:
    Experiment(ws, "sec").submit(ScriptRunConfig({str(source)!r}, command=["true"]))
    out("accepted")
except BadRequest as exc:
    out(str(exc))
""")
    assert "'outputs' is a file" in result


def test_a_fifo_under_a_file_name_does_not_hang_the_agent(clients, shared_source, root_agent):
    alice = clients["alice"]
    run_id = alice.submit(shared_source, ["mkfifo", "outputs/fifo"])
    assert alice.wait(run_id)["status"] == "Completed"
    result = alice.json(f"out([stream('download', run_id={run_id!r}, name='outputs/fifo'), "
                        f"call('put_file', run_id={run_id!r}, name='outputs/fifo', data=b'x', append=True)])",
                        timeout=30)
    for outcome in result:
        assert outcome.get("error") == "bad_request" and "not a regular file" in outcome["message"], outcome
    assert_still_serving(clients["bob"], shared_source)


def test_links_swapped_in_while_the_agent_reads_and_writes_are_never_followed(clients, shared_source, root_agent,
                                                                               scratch):
    alice = clients["alice"]
    victim, before = _victim(scratch, "race-victim", "ROOT-SECRET\n", 0o600)
    # The run flips outputs/x between a file of its own and a link to root's file, as fast as it can.
    flip = (f"echo mine > outputs/real; while :; do ln -sfn {victim} outputs/x; cp outputs/real outputs/x.new; "
            "mv -f outputs/x.new outputs/x; done")
    run_id = alice.submit(shared_source, ["sh", "-c", flip])
    _wait_for(alice, run_id, "Running")
    seen = alice.json(f"""
seen = {{}}
for i in range(300):
    got = stream("download", run_id={run_id!r}, name="outputs/x")
    put = call("put_file", run_id={run_id!r}, name="outputs/x", data=b"appended\\n", append=True)
    for result in (got, put):
        key = "ok" if "ok" in result else result["error"]
        seen[key] = seen.get(key, 0) + 1
        if "ok" in result and "ROOT-SECRET" in json.dumps(result, default=lambda b: b.decode(errors="replace")):
            seen["LEAKED"] = seen.get("LEAKED", 0) + 1
out(seen)
""")
    alice.json(f"out(call('cancel', run_id={run_id!r}))")
    assert "LEAKED" not in seen and set(seen) <= {"ok", "bad_request", "not_found"}, seen
    assert seen.get("bad_request", 0) > 0, f"the race never hit the link: {seen}"
    assert _digest(str(victim)) == before and victim.stat().st_uid == 0
    assert_still_serving(clients["bob"], shared_source)
