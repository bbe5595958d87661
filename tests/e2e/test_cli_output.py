"""What the CLI prints for machines (``--json``, ``--jsonl``: parsed by json.loads and by jq), for comparing
runs (``metrics RUN RUN RUN``, ``ls`` names and tags), and for shells (completion)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

JQ = shutil.which("jq")


def jq(text: str, *args: str) -> str:
    # jq is part of the test set-up (scripts/test installs it): missing, the test fails, it is not skipped.
    assert JQ is not None, "jq is not installed (scripts/test installs it)"
    return subprocess.run([JQ, *args], input=text, capture_output=True, text=True, check=True).stdout


def one_document(text: str):
    """Exactly one JSON document, read by json.loads and by jq (which must see one value, not several)."""
    value = json.loads(text)
    assert json.loads(jq(text, "-c", "-s", ".")) == [value]
    return value


def lines(text: str) -> list:
    objects = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(o, dict) for o in objects)
    assert [json.loads(line) for line in jq(text, "-c", ".").splitlines()] == objects
    return objects


def test_json_and_jsonl_shapes(agent, source):
    cli = agent.cli
    first = one_document(cli("submit", "--source-dir", str(source), "--json", "--", "sh", "-c", "exit 3",
                             check=True).stdout)
    assert isinstance(first, dict) and first["status"] == "Queued"
    array = one_document(cli("submit", "--source-dir", str(source), "--array", "0-2", "--json", "--", "true",
                             check=True).stdout)
    assert set(array) == {"array_id", "runs"} and len(array["runs"]) == 3
    ran = one_document(cli("run", "--source-dir", str(source), "--json", "--", "echo", "hello").stdout)
    assert ran["status"] == "Completed"

    waited = one_document(cli("wait", first["run_id"], array["array_id"], "--json").stdout)
    assert [r["run_id"] for r in waited] == [first["run_id"], *(r["run_id"] for r in array["runs"])]
    streamed = lines(cli("wait", first["run_id"], array["array_id"], "--jsonl").stdout)
    assert streamed == waited

    listed = one_document(cli("ls", "--json", check=True).stdout)
    assert isinstance(listed, list) and len(listed) == 5
    assert lines(cli("ls", "--jsonl", check=True).stdout) == listed
    assert jq(cli("ls", "--json", check=True).stdout, "-r", ".[0].status").strip() == "Completed"
    assert isinstance(one_document(cli("show", first["run_id"], "--json", check=True).stdout), dict)
    status = one_document(cli("status", "--json", check=True).stdout)
    assert status["disk"]["runs_bytes"] > 0

    events = one_document(cli("events", "--json", check=True).stdout)
    assert isinstance(events, list) and events[0]["type"] == "agent.started"
    assert lines(cli("events", "--jsonl", check=True).stdout) == events
    refused = cli("events", "--json", "--follow")
    assert refused.returncode == 2 and "--jsonl" in refused.stderr

    canceled = one_document(cli("cancel", "--json", first["run_id"]).stdout)
    assert canceled == []   # it had already ended: the refusal is on stderr
    removed = one_document(cli("rm", first["run_id"], "--json", check=True).stdout)
    assert removed["removed"][0]["run_id"] == first["run_id"] and removed["freed_bytes"] > 0
    cleaned = one_document(cli("clean", "--json", check=True).stdout)
    assert len(cleaned["removed"]) == 4


METRICS = """\
import sys
from labrun import Run
run = Run.get_context()
for value in map(float, sys.argv[1].split(",")):
    run.log("loss", value)
run.log("accuracy", float(sys.argv[2]))
run.log_row("by_epoch", epoch=1, loss=0.5)
"""


def test_metrics_across_three_runs(agent, source):
    (source / "metrics.py").write_text(METRICS)
    runs = []
    for name, losses, accuracy in (("small", "0.9,0.5,0.6", "0.7"), ("big", "0.8,0.3", "0.9"),
                                   ("tiny", "1.0", "0.5")):
        runs.append(agent.cli("run", "--source-dir", str(source), "--name", name, "--json", "--script",
                              "metrics.py", "--", losses, accuracy, check=True))
    ids = [json.loads(r.stdout)["run_id"] for r in runs]
    table = agent.cli("metrics", *ids, check=True).stdout.splitlines()
    assert table[0].split() == ["METRIC", "small", "big", "tiny", "BEST"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert "0.6 (best 0.5, 3 values)" in rows["loss"] and "0.3 (2 values)" in rows["loss"]
    assert rows["loss"].endswith("0.3 (big)")           # lower is better for a loss
    assert rows["accuracy"].split()[1:] == ["0.7", "0.9", "0.5", "0.9", "(big)"]   # higher for the rest
    assert "table" in rows["by_epoch"]
    as_json = one_document(agent.cli("metrics", *ids, "--json", check=True).stdout)
    assert as_json[ids[0]]["loss"] == [0.9, 0.5, 0.6] and as_json[ids[2]]["loss"] == 1.0


def test_ls_shows_names_and_tags_and_filters_by_tag(agent, source):
    for name, tag in (("alpha", "lr=0.1"), ("beta", "lr=0.2")):
        agent.cli("submit", "--source-dir", str(source), "--name", name, "--tag", tag, "--tag", "sweep", "--",
                  "true", check=True)
    listing = agent.cli("ls", check=True).stdout.splitlines()
    assert any(" alpha " in line and line.rstrip().endswith("lr=0.1,sweep") for line in listing), listing
    only = json.loads(agent.cli("ls", "--tag", "lr=0.2", "--json", check=True).stdout)
    assert [r["display_name"] for r in only] == ["beta"]
    assert len(json.loads(agent.cli("ls", "--tag", "sweep", "--json", check=True).stdout)) == 2
    assert agent.cli("--version", check=True).stdout.startswith("labrun ")


def completion_env(agent):
    return dict(agent.env, PATH=f"{os.path.dirname(sys.executable)}:{agent.env['PATH']}")


def test_completion(agent, source):
    run_id = agent.cli("submit", "--source-dir", str(source), "--", "true", check=True).stdout.strip()
    bash = agent.cli("completion", "bash", check=True).stdout
    assert "complete -o default" in bash and "__complete" in bash

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        script = (f'eval "$(labrun completion bash)"; COMP_WORDS=({" ".join(repr(w) for w in words)}); '
                  f'COMP_CWORD={len(words) - 1}; _labrun; printf "%s\\n" "${{COMPREPLY[@]}}"')
        result = subprocess.run(["bash", "-c", script], env=completion_env(agent), capture_output=True, text=True,
                                timeout=60, check=True)
        return [w for w in result.stdout.splitlines() if w]

    assert complete("labrun ca") == ["cancel"]
    assert "__complete" not in complete("labrun ")
    assert complete("labrun wait ") == [run_id]
    assert complete(f"labrun logs {run_id[:-3]}") == [run_id]
    assert complete("labrun submit --after ") == [run_id]
    assert complete("labrun submit --ar") == ["--array"]
    assert complete("labrun clean --status C") == ["Canceled", "Completed"]
    assert complete("labrun run -- ") == []   # the run's own command line: the shell completes files

    zsh = agent.cli("completion", "zsh", check=True).stdout
    assert zsh.startswith("#compdef labrun") and "__complete" in zsh
    zsh_binary = shutil.which("zsh")
    assert zsh_binary is not None, "zsh is not installed (scripts/test installs it)"
    subprocess.run([zsh_binary, "-n"], input=zsh, text=True, check=True)


@pytest.mark.parametrize("shell", ["fish"])
def test_unknown_shell_is_bad_usage(agent, shell):
    assert agent.cli("completion", shell).returncode == 2


def test_show_prints_the_runs_warnings(agent, source):
    """``labrun show`` gives the run's warnings (Azure ML's ``get_details()["warnings"]``), escaped, and
    ``--json`` carries them."""
    from labrun.cli._format import show

    # A program that leaves a process running when it ends: labrun ends it and warns of it.
    warned = agent.cli("run", "--source-dir", str(source), "--json", "--", "sh", "-c",
                       "sleep 60 >/dev/null 2>&1 & echo started")
    run_id = json.loads(warned.stdout)["run_id"]
    as_json = one_document(agent.cli("show", run_id, "--json", check=True).stdout)
    assert [w["source"] for w in as_json["warnings"]] == ["run"]
    message = as_json["warnings"][0]["message"]
    assert message.startswith("Run: 1 background process(es) of the run were still running")
    shown = agent.cli("show", run_id, check=True).stdout.splitlines()
    assert [line.split(":", 1)[1].strip() for line in shown if line.startswith("Warning:")] == [message]

    quiet = json.loads(agent.cli("run", "--source-dir", str(source), "--json", "--", "true").stdout)["run_id"]
    assert one_document(agent.cli("show", quiet, "--json", check=True).stdout)["warnings"] == []
    assert "Warning:" not in agent.cli("show", quiet, check=True).stdout

    # A warning's text is shown as safely as every other string (some name what the user wrote).
    hostile = show({**as_json, "warnings": [{"source": "environment", "message": "bad\x1b[2J\rpkg\nnext"}]})
    assert "bad\\e[2J\\rpkg\\nnext" in hostile and all(c.isprintable() or c == "\n" for c in hostile)
