"""Content-addressed snapshots end to end: what travels, what the agent refuses, what a run sees, in place."""

import hashlib
import os
import pwd
import sqlite3
import stat
import zipfile
from pathlib import Path

import pytest

from labrun import Experiment, ScriptRunConfig
from labrun._connection import AgentConnection
from labrun.exceptions import BadRequest, NotFound, SnapshotException, TooLarge
from labrun.protocol._content_hash import CHUNKED, content_hash
from tests.e2e.test_agent import as_nobody, needs_root, nobody_client, shared_source, wait_until  # noqa: F401
from tests.stored_contents import inline, stored, stored_bytes

OLD = 1_600_000_000 * 10**9   # an mtime well in the past: the hash cache trusts it


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, ns=(OLD, OLD))
    return root


def spec(files, command=("true",), **changes):
    return {"experiment": "cas", "command": list(command), "snapshot": {"files": files}, **changes}


def blob(data: bytes, digest: str | None = None, offset: int = 0, size: int | None = None) -> dict:
    return {"hash": digest or sha(data), "size": len(data) if size is None else size, "offset": offset, "data": data}


def objects(agent) -> set[str]:
    return stored(agent.state_dir)


class CallSpy:
    """Counts the requests a workspace's connection sends, by op, and what each passes or carries."""

    def __init__(self, workspace):
        self.ops: list[str] = []
        self.carried: list[set[str]] = []   # the hashes of the contents each submit carried
        self.carried_items: list[int] = []  # and how many it carried
        self.passed: list[int] = []         # how many open files each blob_fds passed
        connection = workspace.connection
        original, passing = connection.call, connection.call_passing

        def call(op, **args):
            self.ops.append(op)
            if op == "submit":
                self.carried.append({item["hash"] for item in args.get("contents", [])})
                self.carried_items.append(len(args.get("contents", [])))
            return original(op, **args)

        def call_passing(op, fds, **args):
            self.ops.append(op)
            self.passed.append(len(fds))
            return passing(op, fds, **args)

        connection.call, connection.call_passing = call, call_passing


def test_only_missing_contents_travel_and_a_resubmit_sends_none(agent, tmp_path):
    tree = make_tree(tmp_path / "src", {"a.txt": b"alpha", "sub/b.txt": b"beta", "sub/dup.txt": b"alpha",
                                        "big.bin": os.urandom(20 << 20)})
    workspace = agent.workspace()
    spy = CallSpy(workspace)
    experiment = Experiment(workspace, "cas")
    first = experiment.submit(ScriptRunConfig(str(tree), command="cat a.txt sub/b.txt sub/dup.txt; sha256sum big.bin"))
    # Files the hash cache does not know: the small ones go with the submit itself, each content once; the others
    # go to the agent open, all in one request before it, and the client reads none of them.
    assert spy.ops == ["blob_fds", "submit"] and spy.passed == [1]
    assert spy.carried == [{sha(b"alpha"), sha(b"beta")}] and spy.carried_items == [2]   # "alpha" once
    first.wait_for_completion()
    log = first.get_log()
    assert log.startswith("alphabetaalpha") and sha((tree / "big.bin").read_bytes()) in log
    # Stored once each; the large one under its hash by chunks, which the agent took on two threads.
    assert objects(agent) == {sha(b"alpha"), sha(b"beta"), content_hash((tree / "big.bin").read_bytes(), CHUNKED)}

    spy.ops.clear()
    second = experiment.submit(ScriptRunConfig(str(tree), command="cat a.txt"))
    assert spy.ops == ["submit"] and spy.carried[-1] == set()   # nothing sent again
    second.wait_for_completion()
    assert second.get_log() == "alpha"

    (tree / "a.txt").write_bytes(b"changed")
    spy.ops.clear()
    third = experiment.submit(ScriptRunConfig(str(tree), command="cat a.txt"))
    assert spy.ops == ["submit"] and spy.carried[-1] == {sha(b"changed")}
    third.wait_for_completion()
    assert third.get_log() == "changed"


def test_a_client_of_an_agent_without_blob_fds_hashes_and_uploads_bytes(agent, tmp_path):
    tree = make_tree(tmp_path / "src", {"a.txt": b"alpha", "big.bin": os.urandom(9 << 20)})
    workspace = agent.workspace()
    del workspace.connection.agent["blob_fds"]   # as an older agent answers hello
    spy = CallSpy(workspace)
    experiment = Experiment(workspace, "cas")
    run = experiment.submit(ScriptRunConfig(str(tree), command="cat a.txt; sha256sum big.bin"))
    # 9 MiB: two frames at least (three when the small file's goes first)
    assert spy.ops[0] == spy.ops[-1] == "submit" and spy.ops[1:-1] in (["blob_put"] * 2, ["blob_put"] * 3)
    run.wait_for_completion()
    assert run.get_log().startswith("alpha") and sha((tree / "big.bin").read_bytes()) in run.get_log()
    spy.ops.clear()
    experiment.submit(ScriptRunConfig(str(tree), command="true"))
    assert spy.ops == ["submit"]


def test_a_client_of_an_agent_that_takes_no_contents_with_a_submit_passes_small_files_open(agent, tmp_path):
    tree = make_tree(tmp_path / "src", {"a.txt": b"alpha", "b.txt": b"beta"})
    workspace = agent.workspace()
    del workspace.connection.agent["submit_contents"]   # as an older agent answers hello
    spy = CallSpy(workspace)
    run = Experiment(workspace, "cas").submit(ScriptRunConfig(str(tree), command="cat a.txt b.txt"))
    assert spy.ops == ["blob_fds", "submit"] and spy.passed == [2] and spy.carried == [set()]
    run.wait_for_completion()
    assert run.get_log() == "alphabeta"


def test_contents_a_submit_carries_are_checked_before_anything_is_kept(agent):
    hello, large = b"hello\n", os.urandom(8193)
    files = [["hello.txt", len(hello), 0o644, sha(hello)]]
    with AgentConnection(agent.socket) as connection:
        assert connection.agent["submit_contents"] == {"max_size": 8192, "max_bytes": 8 << 20}
        refused = [
            ([{"hash": sha(hello), "data": b"HELLO\n"}], files, BadRequest, "does not match its hash"),
            ([{"hash": sha(b"other"), "data": b"other"}], files, BadRequest, "not the content of a file of the snapshot"),
            ([{"hash": sha(hello), "data": hello + b"x"}], files, BadRequest, "not the content of a file"),
            ([{"hash": sha(large), "data": large}], files + [["large", len(large), 0o644, sha(large)]], TooLarge,
             "over the 8192"),
        ]
        for contents, manifest, error, message in refused:
            with pytest.raises(error, match=message) as info:
                connection.call("submit", spec=spec(manifest), contents=contents)
            assert info.value.details["field"] == "args.contents"
        # Over the snapshot's limits: refused before anything is kept, as it would be after.
        many = files + [[f"f{i}", 0, 0o644, sha(b"")] for i in range(2000)]
        with pytest.raises(TooLarge, match="snapshot has 2001 files"):
            connection.call("submit", spec=spec(many), contents=[{"hash": sha(hello), "data": hello}])
        with pytest.raises(BadRequest, match="in place has no snapshot"):
            connection.call("submit", spec={"experiment": "cas", "command": ["true"],
                                            "snapshot": {"in_place": str(agent.root)}},
                            contents=[{"hash": sha(hello), "data": hello}])
        assert objects(agent) == set() and connection.call("list", all=True) == []
        # Carried whole: no upload first, and the run gets it. Once is enough: the next submit names it alone.
        run = connection.call("submit", spec=spec(files, command=["cat", "hello.txt"]),
                              contents=[{"hash": sha(hello), "data": hello}])
        assert connection.call("wait", run_id=run["run_id"])["status"] == "Completed"
        assert inline(agent.state_dir) == {sha(hello)}
        again = connection.call("submit", spec=spec(files, command=["cat", "hello.txt"]))
        assert connection.call("wait", run_id=again["run_id"])["status"] == "Completed"
    for shown in (run, again):
        assert (agent.state_dir / "runs" / shown["run_id"] / "logs" / "std_log.txt").read_bytes() == hello


def test_a_file_the_client_knows_but_the_agent_lacks_is_passed_open(make_agent, tmp_path):
    tree = make_tree(tmp_path / "src", {"a.txt": b"alpha"})
    Experiment(make_agent().workspace(), "cas").submit(ScriptRunConfig(str(tree), command=["true"]))
    other = make_agent()   # a new agent: the client's hash cache knows a.txt, this store does not
    spy = CallSpy(workspace := other.workspace())
    run = Experiment(workspace, "cas").submit(ScriptRunConfig(str(tree), command="cat a.txt"))
    assert spy.ops == ["submit", "blob_fds", "submit"]
    run.wait_for_completion()
    assert run.get_log() == "alpha"


def test_a_retry_after_an_upload_does_not_carry_the_contents_again(make_agent, tmp_path):
    tree = make_tree(tmp_path / "src", {"a.txt": b"alpha"})
    Experiment(make_agent().workspace(), "cas").submit(ScriptRunConfig(str(tree), command=["true"]))
    make_tree(tree, {"b.txt": b"beta"})
    other = make_agent()   # the client's hash cache knows a.txt, this store does not; b.txt is new to both
    spy = CallSpy(workspace := other.workspace())
    run = Experiment(workspace, "cas").submit(ScriptRunConfig(str(tree), command="cat a.txt b.txt"))
    assert spy.ops == ["submit", "blob_fds", "submit"] and spy.carried == [{sha(b"beta")}, set()]
    run.wait_for_completion()
    assert run.get_log() == "alphabeta"


def test_carried_contents_leave_room_in_the_frame_for_the_rest(make_agent, tmp_path, monkeypatch):
    # 6 MiB frames: a submit carries at most half of one; the manifest's share comes off that too.
    agent = make_agent("[agent]\nmax_frame_bytes = 6291456\n")
    tree = make_tree(tmp_path / "src", {f"d{i // 100}/f{i}.txt": os.urandom(8192) for i in range(800)})
    monkeypatch.setenv("XDG_CACHE_HOME", "/dev/null/cache")   # no hash cache to help a retry
    workspace = agent.workspace()
    assert workspace.connection.agent["submit_contents"]["max_bytes"] == 3 << 20
    spy = CallSpy(workspace)
    run = Experiment(workspace, "cas").submit(ScriptRunConfig(str(tree), command="ls d7 | wc -l"))
    assert spy.ops == ["blob_fds", "submit"]
    assert 300 <= len(spy.carried[0]) <= (3 << 20) // 8192 and spy.passed == [800 - len(spy.carried[0])]
    assert run.wait_for_completion()["status"] == "Completed" and run.get_log().strip() == "100"


def test_a_file_that_changes_while_it_is_passed_is_refused_by_name(agent, tmp_path):
    tree = make_tree(tmp_path / "src", {"a.txt": b"alpha"})
    # Regular files whose size is not what reading gives: as one that grew (/proc) or shrank (/sys) meanwhile.
    for target in ("/proc/self/status", "/sys/devices/system/cpu/online"):
        (tree / "moving").unlink(missing_ok=True)
        (tree / "moving").symlink_to(target)
        with pytest.raises(SnapshotException, match=r"moving changed while it was being submitted; submit again"):
            Experiment(agent.workspace(), "cas").submit(ScriptRunConfig(str(tree), command=["true"]))


def test_agent_answers_the_hashes_it_lacks_and_checks_uploads(agent):
    hello, world = b"hello\n", b"world" * 1000
    files = [["hello.txt", len(hello), 0o644, sha(hello)], ["bin/run.sh", len(world), 0o755, sha(world)]]
    with AgentConnection(agent.socket) as connection:
        with pytest.raises(NotFound) as info:
            connection.call("submit", spec=spec(files))
        assert sorted(info.value.details["missing"]) == sorted([sha(hello), sha(world)])

        # Poisoned: content that does not match its hash never enters the store.
        with pytest.raises(BadRequest, match="does not match its hash"):
            connection.call("blob_put", blobs=[blob(b"evil\n", digest=sha(hello), size=len(hello) - 1)])
        with pytest.raises(BadRequest, match="does not match its hash"):
            connection.call("blob_put", blobs=[blob(b"HELLO\n", digest=sha(hello))])
        with pytest.raises(BadRequest, match="more than its declared"):
            connection.call("blob_put", blobs=[blob(hello + b"x", digest=sha(hello), size=len(hello))])
        assert objects(agent) == set()
        with pytest.raises(NotFound):
            connection.call("submit", spec=spec(files))

        # Chunks must come in order; a gap aborts the upload.
        connection.call("blob_put", blobs=[blob(world[:100], digest=sha(world), size=len(world))])
        with pytest.raises(BadRequest, match="continues at offset 100"):
            connection.call("blob_put", blobs=[blob(world[200:], digest=sha(world), size=len(world), offset=200)])
        with pytest.raises(BadRequest, match="no upload"):
            connection.call("blob_put", blobs=[blob(world[100:], digest=sha(world), size=len(world), offset=100)])

        result = connection.call("blob_put", blobs=[blob(hello), blob(world[:3000], sha(world), 0, len(world))])
        assert [b["complete"] for b in result["blobs"]] == [True, False]
        connection.call("blob_put", blobs=[blob(world[3000:], sha(world), 3000, len(world))])
        assert objects(agent) == {sha(hello), sha(world)}

        # A declared size must match the stored content's.
        wrong = [["hello.txt", len(hello) + 1, 0o644, sha(hello)]]
        with pytest.raises(BadRequest, match="declared as 7 bytes"):
            connection.call("submit", spec=spec(wrong))

        run = connection.call("submit", spec=spec(files, command=["sh", "-c", "cat hello.txt; ls -l bin/run.sh"]))
        done = connection.call("wait", run_id=run["run_id"])
    assert done["status"] == "Completed", done
    log = (agent.state_dir / "runs" / run["run_id"] / "logs" / "std_log.txt").read_text()
    assert log.startswith("hello\n-rwxr-xr-x")


@pytest.mark.parametrize("entry, message", [
    (["../escape", 0, 0o644, sha(b"")], "'.', '..' and empty components"),
    (["a/../../escape", 0, 0o644, sha(b"")], "'.', '..' and empty components"),
    (["/etc/cron.d/x", 0, 0o644, sha(b"")], "must be a relative path"),
    (["a\x00b", 0, 0o644, sha(b"")], "may not contain NUL"),
    (["a//b", 0, 0o644, sha(b"")], "empty components"),
    (["x", 0, 0o4755, sha(b"")], "permission bits"),
    (["x", -1, 0o644, sha(b"")], "size in bytes"),
    (["x", 0, 0o644, "ABC"], "SHA-256 hash"),
    (["x", 0, 0o644, sha(b"").upper()], "SHA-256 hash"),
    (["x" * 256, 0, 0o644, sha(b"")], "longer than 255 bytes"),
    (["x", 0, 0o644], "expected \\[path, size, mode, hash\\]"),
])
def test_manifest_entries_are_validated(agent, entry, message):
    with AgentConnection(agent.socket) as connection:
        with pytest.raises(BadRequest, match=message) as info:
            connection.call("submit", spec=spec([entry]))
        assert info.value.details["field"].startswith("args.spec.snapshot.files[0]")
        assert connection.call("list", all=True) == []


def test_manifest_duplicates_and_file_directory_clashes_are_refused(agent):
    empty = sha(b"")
    with AgentConnection(agent.socket) as connection:
        with pytest.raises(BadRequest, match="listed twice"):
            connection.call("submit", spec=spec([["a", 0, 0o644, empty], ["a", 0, 0o644, empty]]))
        with pytest.raises(BadRequest, match="'a' is a file and also a directory"):
            connection.call("submit", spec=spec([["a", 0, 0o644, empty], ["a/b/c", 0, 0o644, empty]]))
        with pytest.raises(BadRequest, match="'in_place'"):
            connection.call("submit", spec={"experiment": "cas", "command": ["true"],
                                            "snapshot": {"files": [], "in_place": "/tmp"}})
        with pytest.raises(BadRequest, match="absolute path"):
            connection.call("submit", spec={"experiment": "cas", "command": ["true"],
                                            "snapshot": {"in_place": "relative/dir"}})


def test_a_run_writing_to_its_snapshot_never_changes_the_store(agent, tmp_path):
    data = b"original content\n"
    tree = make_tree(tmp_path / "src", {"data.txt": data})
    experiment = Experiment(agent.workspace(), "cas")
    writer = experiment.submit(ScriptRunConfig(str(tree), command="echo scribble >> data.txt; "
                                                                   "chmod 777 data.txt; cat data.txt"))
    writer.wait_for_completion()
    assert writer.get_log() == "original content\nscribble\n"
    assert stored_bytes(agent.state_dir, sha(data)) == data
    stored_file = agent.state_dir / "cas" / "objects" / sha(data)[:2] / sha(data)
    if stored_file.exists():   # (a client without blob_fds uploads bytes, kept as files)
        assert stored_file.stat().st_mode & 0o777 == 0o400 and stored_file.stat().st_nlink == 1   # no hard link
    reader = experiment.submit(ScriptRunConfig(str(tree), command="cat data.txt"))
    reader.wait_for_completion()
    assert reader.get_log() == "original content\n"


def test_uploads_a_connection_never_used_are_collected_when_it_closes(agent):
    data = os.urandom(1000)
    with AgentConnection(agent.socket) as connection:
        connection.call("blob_put", blobs=[blob(data)])
        assert objects(agent) == {sha(data)}
    wait_until(lambda: objects(agent) == set(), what="the unused upload to be collected")


def test_snapshot_limits_come_from_the_agent_config(make_agent, tmp_path):
    agent = make_agent("[snapshot]\nmax_files = 3\nmax_bytes = 1000\n")
    tree = make_tree(tmp_path / "src", {f"f{i}": b"x" for i in range(4)})
    workspace = agent.workspace()
    assert workspace.connection.agent["snapshot"] == {"max_files": 3, "max_bytes": 1000}
    with pytest.raises(SnapshotException, match="more than 3 files") as info:
        Experiment(workspace, "cas").submit(ScriptRunConfig(str(tree), command=["true"]))
    assert "--in-place" in str(info.value) and "snapshot=False" in str(info.value)
    (tree / "f3").unlink()
    (tree / "f2").write_bytes(b"x" * 1001)
    with pytest.raises(SnapshotException, match="exceeds the limit"):
        Experiment(workspace, "cas").submit(ScriptRunConfig(str(tree), command=["true"]))
    # The agent checks again: a client that skips its checks is refused before anything is stored.
    empty = sha(b"")
    with AgentConnection(agent.socket) as connection:
        with pytest.raises(TooLarge, match=r"limit is 3 \(\[snapshot\] max_files\); run in place"):
            connection.call("submit", spec=spec([[f"f{i}", 0, 0o644, empty] for i in range(4)]))
        with pytest.raises(TooLarge, match="max_bytes"):
            connection.call("submit", spec=spec([["big", 2000, 0o644, empty]]))
        with pytest.raises(TooLarge, match="over this agent's snapshot limit"):
            connection.call("blob_put", blobs=[blob(b"y" * 10, size=2000)])
    # Uploads that no submit uses are bounded too: one snapshot's worth per connection at a time.
    with AgentConnection(agent.socket) as connection:
        first, second = os.urandom(600), os.urandom(600)
        connection.call("blob_put", blobs=[blob(first)])
        with pytest.raises(TooLarge, match="without a submit using them"):
            connection.call("blob_put", blobs=[blob(second)])
        connection.call("submit", spec=spec([["first", 600, 0o644, sha(first)]]))
        connection.call("blob_put", blobs=[blob(second)])


def test_over_the_default_limit_the_error_points_to_in_place(agent, tmp_path):
    many = tmp_path / "many"
    many.mkdir()
    for i in range(2001):
        (many / f"f{i}").write_text("")
    with pytest.raises(SnapshotException, match="more than 2000 files") as info:
        Experiment(agent.workspace(), "cas").submit(ScriptRunConfig(str(many), command=["true"]))
    assert "labrun run --in-place" in str(info.value) and "ScriptRunConfig(..., snapshot=False)" in str(info.value)
    result = agent.cli("run", "--source-dir", str(many), "--", "true")
    assert result.returncode == 125 and "--in-place" in result.stderr


def test_in_place_runs_in_the_source_directory(agent, tmp_path):
    many = tmp_path / "checkout"
    many.mkdir()
    for i in range(2500):   # over Azure ML's limit: fine in place
        (many / f"f{i}").write_text("")
    result = agent.cli("run", "--in-place", "--source-dir", str(many), "--", "sh", "-c",
                       "pwd; ls | wc -l; touch built-here")
    assert result.returncode == 0, result.stderr
    cwd, count = result.stdout.split()
    assert cwd == str(many) and int(count) == 2500
    assert (many / "built-here").exists()

    run = Experiment(agent.workspace(), "cas").submit(
        ScriptRunConfig(str(many), command="pwd; echo $LABRUN_OUTPUT_DIR", snapshot=False))
    run.wait_for_completion()
    cwd, outputs = run.get_log().split()
    assert cwd == str(many)
    assert Path(outputs).is_dir() and Path(outputs) == agent.state_dir / "runs" / run.id / "snapshot" / "outputs"

    with pytest.raises(BadRequest, match="not a file in"):
        agent.workspace().connection.call(
            "submit", spec={"experiment": "cas", "script": "missing.py", "snapshot": {"in_place": str(many)}})


@needs_root
def test_snapshots_are_made_as_the_user_and_in_place_is_checked_as_the_user(agent, shared_source, nobody_client):
    agent.root.chmod(0o755)
    nobody = pwd.getpwnam("nobody")
    cache = shared_source / "cache"
    cache.mkdir()
    os.chown(cache, nobody.pw_uid, nobody.pw_gid)
    (shared_source / "data.txt").write_bytes(b"root's data")
    (shared_source / "data.txt").chmod(0o644)
    # root already stored this content: nobody must still upload it (a hash alone never grants a content).
    root_run = Experiment(agent.workspace(), "cas").submit(ScriptRunConfig(str(shared_source), command=["true"]))
    root_run.wait_for_completion()
    # A file nobody may not read: nobody's client cannot open it, so the agent never gets it (nor reads it as root).
    (shared_source / "secret.txt").write_bytes(b"root only")
    (shared_source / "secret.txt").chmod(0o600)
    code = ("import os\nfrom labrun import Workspace, Experiment, ScriptRunConfig\n"
            f"os.environ['XDG_CACHE_HOME'] = {str(cache)!r}\n"
            "ws = Workspace()\nops = []\ncall, passing = ws.connection.call, ws.connection.call_passing\n"
            "ws.connection.call = lambda op, **a: (ops.append(op), call(op, **a))[1]\n"
            "ws.connection.call_passing = lambda op, fds, **a: (ops.append(op), passing(op, fds, **a))[1]\n"
            "run = Experiment(ws, 'users').submit(ScriptRunConfig('.', command='stat -c %u:%g:%a data.txt .'))\n"
            "submitted = ','.join(ops)\n"
            "run.wait_for_completion()\nprint(run.id, submitted)\nprint(run.get_log(), end='')\n")
    result = as_nobody(agent, nobody_client, code, shared_source)
    assert result.returncode == 0, result.stderr
    header, log = result.stdout.split("\n", 1)
    run_id, ops = header.split()
    assert ops == "submit"   # carried by nobody's submit: read by nobody's client, with nobody's rights
    owner = f"{nobody.pw_uid}:{nobody.pw_gid}"
    assert log.split() == [f"{owner}:644", f"{owner}:755"]
    assert not (agent.state_dir / "runs" / run_id / "snapshot" / "secret.txt").exists()
    assert sha(b"root only") not in objects(agent)
    assert list(cache.glob("labrun/hashes/*.msgpack")), "nobody's hash cache is written"

    # In place, the user must be able to enter the directory: checked with their rights, not root's.
    private = agent.root / "private"
    private.mkdir(mode=0o700)
    probe = as_nobody(agent, nobody_client, (
        "from labrun import Workspace, Experiment, ScriptRunConfig\nfrom labrun.exceptions import BadRequest\n"
        "try:\n"
        f"    Experiment(Workspace(), 'users').submit(ScriptRunConfig({str(private)!r}, command=['true'], "
        "snapshot=False))\n"
        "except BadRequest as exc:\n    print(exc.message)\n"), shared_source)
    assert "nobody cannot use" in probe.stdout and "Permission denied" in probe.stdout, probe.stdout + probe.stderr


@needs_root
def test_an_unreadable_directory_is_skipped_and_an_unreadable_source_is_named(agent, shared_source, nobody_client):
    agent.root.chmod(0o755)
    (shared_source / "secret").mkdir(mode=0o700)
    (shared_source / "secret" / "key").write_text("root's\n")
    code = ("import os\nfrom labrun import Workspace, Experiment, ScriptRunConfig\n"
            "from labrun.exceptions import SnapshotException\n"
            "run = Experiment(Workspace(), 'users').submit(ScriptRunConfig('.', command='ls -R'))\n"
            "run.wait_for_completion()\nprint(run.get_status())\nprint(run.get_log(), end='')\n"
            "try:\n    Experiment(Workspace(), 'users').submit(ScriptRunConfig('secret', command='true'))\n"
            "except SnapshotException as exc:\n    print('refused:', exc)\n")
    result = as_nobody(agent, nobody_client, code, shared_source)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Completed\n"), result.stdout
    assert "whoami.py" in result.stdout and "key" not in result.stdout
    assert "refused: cannot read source_directory 'secret': Permission denied" in result.stdout, result.stdout


def test_a_queued_run_keeps_its_snapshot_across_a_restart_and_edits(make_agent, tmp_path):
    agent = make_agent("[resources]\nmax_concurrent_runs = 1\n")
    tree = make_tree(tmp_path / "src", {"config.txt": b"as submitted\n"})
    experiment = Experiment(agent.workspace(), "cas")
    blocker = experiment.submit(ScriptRunConfig(str(tree), command=["sleep", "300"]))
    queued = experiment.submit(ScriptRunConfig(str(tree), command="cat config.txt"))
    (tree / "config.txt").write_bytes(b"edited later\n")   # a queued run never sees later edits
    agent.restart()
    experiment = Experiment(agent.workspace(), "cas")
    # The blocker outlived the restart (reattached; or queued again if it had not started yet): cancel it.
    assert experiment.workspace._call("get", run_id=blocker.id)["status"] in ("Running", "Queued")
    experiment.workspace._call("cancel", run_id=blocker.id)
    details = experiment.workspace.wait_for_run(queued.id)
    assert details["status"] == "Completed"
    assert (agent.state_dir / "runs" / queued.id / "logs" / "std_log.txt").read_text() == "as submitted\n"
    assert objects(agent) == {sha(b"as submitted\n")}   # the edit was never uploaded


def test_a_first_submit_of_small_files_keeps_them_in_the_store_database_and_the_run_gets_them_exactly(agent,
                                                                                                      tmp_path):
    files = {"run.sh": b"#!/bin/sh\nfor f in $(find . -type f | sort); do stat -c '%n %a' $f; done\n",
             "pkg/__init__.py": b"", "pkg/data.bin": os.urandom(3000), "pkg/big.bin": os.urandom(20_000),
             "notes/readme.txt": b"small\n" * 100}
    tree = make_tree(tmp_path / "src", files)
    os.chmod(tree / "run.sh", 0o750)
    os.chmod(tree / "pkg" / "data.bin", 0o600)
    experiment = Experiment(agent.workspace(), "cas")
    run = experiment.submit(ScriptRunConfig(str(tree), command=["sh", "run.sh"]))
    assert run.wait_for_completion()["status"] == "Completed"
    small = {sha(data) for data in files.values() if len(data) <= 8192}
    assert small <= inline(agent.state_dir) and sha(files["pkg/big.bin"]) not in inline(agent.state_dir)
    snapshot = agent.state_dir / "runs" / run.id / "snapshot"
    for name, data in files.items():
        assert (snapshot / name).read_bytes() == data
    assert sorted(run.get_log().split("\n")[:-1]) == sorted(
        [f"./{name} {oct(stat.S_IMODE((tree / name).stat().st_mode))[2:]}" for name in files])
    # The download of the snapshot reads the store's database too.
    with zipfile.ZipFile(run.restore_snapshot(path=str(tmp_path / "restored"))) as archive:
        assert {name: archive.read(name) for name in archive.namelist() if not name.endswith("/")} == files
    # Removing the run (the only one using them), once the connection that stored them is closed, deletes the rows.
    experiment.workspace.close()
    agent.cli("rm", run.id, check=True)
    wait_until(lambda: objects(agent) == set(), what="the snapshot's contents to be collected")


def test_small_contents_an_older_agent_stored_as_files_still_make_snapshots(make_agent, tmp_path):
    agent = make_agent()
    tree = make_tree(tmp_path / "src", {"config.txt": b"stored as a file\n"})
    experiment = Experiment(agent.workspace(), "cas")
    first = experiment.submit(ScriptRunConfig(str(tree), command="cat config.txt"))
    assert first.wait_for_completion()["status"] == "Completed"
    agent.stop()
    # What an older agent's store holds: the content as a file, and no row for it.
    digest = sha(b"stored as a file\n")
    objects_dir = agent.state_dir / "cas" / "objects" / digest[:2]
    objects_dir.mkdir(parents=True, exist_ok=True)
    (objects_dir / digest).write_bytes(b"stored as a file\n")
    os.chmod(objects_dir / digest, 0o400)
    db = sqlite3.connect(agent.state_dir / "cas" / "small.db")
    db.execute("DELETE FROM contents")
    db.commit()
    db.close()
    agent.start()
    again = Experiment(agent.workspace(), "cas").submit(ScriptRunConfig(str(tree), command="cat config.txt"))
    assert again.wait_for_completion()["status"] == "Completed"
    assert again.get_log() == "stored as a file\n"
    assert inline(agent.state_dir) == set()   # held already: nothing was stored again
