"""Submit examples/train.py the Azure ML SDK v1 way, with only the import line changed."""

import os

from labrun import Experiment, ScriptRunConfig, Workspace

here = os.path.dirname(os.path.abspath(__file__))

ws = Workspace()
experiment = Experiment(workspace=ws, name="example")
config = ScriptRunConfig(source_directory=here, script="train.py", arguments=["--epochs", 5, "--lr", 0.05])
run = experiment.submit(config)
details = run.wait_for_completion(show_output=True)
print(f"{run.id}: {details['status']}")
