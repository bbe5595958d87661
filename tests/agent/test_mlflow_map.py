"""How a labrun run maps onto MLflow: pure functions, no server."""

from types import SimpleNamespace

from labrun.agent import _mlflow_map as mapping


def test_script_arguments_become_params():
    assert mapping.script_params(["data.csv", "--lr", "0.01", "--epochs=5", "--verbose", "--shift", "-3",
                                  "--lr", "0.02", "-q"]) == \
        {"lr": "0.02", "epochs": "5", "verbose": "true", "shift": "-3", "q": "true"}
    assert mapping.script_params(["--", "-", "--=x", "-1"]) == {}
    assert mapping.script_params(["--na$me", "v" * 7000]) == {"na_me": "v" * 5997 + "..."}


def test_names_mlflow_would_refuse_are_made_acceptable():
    assert mapping.name("loss/train") == "loss/train"
    assert mapping.name("acc@1 (val)") == "acc_1 _val_"
    for hostile in ("", ".", "..", "/abs", "a/../b", "a//b", "a/./b", "é"):
        cleaned = mapping.name(hostile)
        assert cleaned and cleaned not in (".", "..") and not cleaned.startswith("/")
        assert "/../" not in f"/{cleaned}/" and "//" not in cleaned and "/./" not in f"/{cleaned}/"
    assert len(mapping.name("x" * 1000)) == mapping.MAX_KEY


def test_metrics_keep_steps_history_and_numbers_only():
    counters = {}
    rows = [
        {"name": "loss", "kind": "scalar", "value": 0.5, "step": None, "time": 10.0},
        {"name": "loss", "kind": "scalar", "value": 0.25, "step": None, "time": 11.0},
        {"name": "acc", "kind": "scalar", "value": True, "step": 7, "time": 12.0},
        {"name": "acc", "kind": "scalar", "value": 0.9, "step": None, "time": 12.5},
        {"name": "lr", "kind": "list", "value": [0.1, "x", 0.01], "time": 13.0},
        {"name": "eval", "kind": "row", "value": {"epoch": 1, "f1": 0.5}, "time": 14.0},
        {"name": "note", "kind": "scalar", "value": "text", "step": None, "time": 15.0},
        {"name": "big", "kind": "scalar", "value": 10 ** 400, "step": None, "time": 15.0},
        {"name": "tbl", "kind": "table", "value": {"a": [1, 2]}, "time": 16.0},
        {"name": "nan", "kind": "scalar", "value": float("nan"), "step": 1, "time": 17.0},
    ]
    found = [(m["key"], m["value"], m["step"], m["timestamp"]) for m in mapping.metrics(rows, counters)]
    assert found == [("loss", 0.5, 0, 10000), ("loss", 0.25, 1, 11000), ("acc", 1.0, 7, 12000),
                     ("acc", 0.9, 8, 12500), ("lr", 0.1, 0, 13000), ("lr", 0.01, 2, 13000),
                     ("eval/epoch", 1.0, 0, 14000), ("eval/f1", 0.5, 0, 14000), ("nan", "NaN", 1, 17000)]
    # The next batch goes on where this one stopped.
    more = mapping.metrics([{"name": "loss", "kind": "scalar", "value": 0.1, "step": None, "time": 20.0}], counters)
    assert more[0]["step"] == 2


def test_tags_and_statuses():
    record = SimpleNamespace(run_id="e_1_ab", experiment="e", number=3, user="alice", spec={
        "script": "train.py", "arguments": ["--lr", "1"], "display_name": "first", "compute_target": "gpu",
        "tags": {"team": "vision", "mlflow.parentRunId": "forged", "labrun.user": "mallory"}})
    tags = mapping.tags(record, {"phase": "eval", "gone": None}, "parent123")
    assert tags["mlflow.parentRunId"] == "parent123" and tags["labrun.user"] == tags["mlflow.user"] == "alice"
    assert tags["tag.mlflow.parentRunId"] == "forged" and tags["tag.labrun.user"] == "mallory"
    assert tags["team"] == "vision" and tags["phase"] == "eval" and "gone" not in tags
    assert tags["mlflow.runName"] == "first" and tags["labrun.command"] == "python train.py --lr 1"
    assert tags["labrun.target"] == "gpu" and tags["labrun.number"] == "3"
    assert mapping.tags(record, {}, None).get("mlflow.parentRunId") is None
    assert [mapping.mlflow_status(s) for s in ("Queued", "Preparing", "Running", "Finalizing", "CancelRequested",
                                               "Completed", "Failed", "Canceled")] == \
        ["SCHEDULED", "RUNNING", "RUNNING", "RUNNING", "RUNNING", "FINISHED", "FAILED", "KILLED"]
    assert mapping.config_params({"compute_target": "local", "resources": {"cpus": 2, "memory": None, "gpus": 1},
                                  "environment": {"name": "torch", "version": 2, "docker": {"base_image": "img"}},
                                  "distributed": {"kind": "pytorch", "process_count": 4}}) == \
        {"labrun.target": "local", "labrun.cpus": "2", "labrun.gpus": "1", "labrun.environment": "torch:2",
         "labrun.image": "img", "labrun.distributed": "pytorch", "labrun.process_count": "4"}
