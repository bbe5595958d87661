"""The work of scripts/screenshot-mlflow: an agent with its embedded MLflow UI, one run, one screenshot."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = """
import math, random
from labrun import Run
run = Run.get_context()
random.seed(1)
for epoch in range(60):
    loss = 2.0 * math.exp(-epoch / 12) + 0.05 * random.random()
    run.log("loss", loss, step=epoch)
    run.log("val_loss", loss * 1.1 + 0.04 * random.random(), step=epoch)
    run.log("accuracy", 1 - loss / 2.2, step=epoch)
"""


def main(out: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="labrun-shot-") as tmp:
        root = Path(tmp)
        (root / "agent.toml").write_text("[mlflow]\nembedded = true\n")
        (root / "src").mkdir()
        (root / "src" / "train.py").write_text(TRAIN)
        socket = root / "agent.sock"
        env = dict(os.environ, LABRUN_SOCKET=str(socket), LABRUN_NO_AUTOSTART="1")
        with open(root / "agent.log", "ab") as log:
            agent = subprocess.Popen([sys.executable, "-m", "labrun.agent", "--socket", str(socket), "--state-dir",
                                      str(root / "state"), "--config", str(root / "agent.toml")],
                                     stdout=log, stderr=log, env=env)
        try:
            deadline = time.monotonic() + 30
            while not socket.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            url = subprocess.run([sys.executable, "-m", "labrun.cli", "ui"], env=env, check=True,
                                 capture_output=True, text=True).stdout.strip()
            print(f"MLflow UI at {url}")
            from labrun import Experiment, ScriptRunConfig, Workspace

            run = Experiment(Workspace(socket=socket), "mnist").submit(
                ScriptRunConfig(str(root / "src"), script="train.py", arguments=["--lr", "0.01", "--epochs", "60"]))
            run.wait_for_completion()
            deadline = time.monotonic() + 120
            while "/runs/" not in (page := run.get_portal_url() or "") and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2)   # the final status and params land just after the link exists
            print(f"run page {page}")
            profile = root / "chromium-profile"
            profile.mkdir()
            out.parent.mkdir(parents=True, exist_ok=True)
            # Twice: the first load warms the server's and the browser's caches, so that the charts of the
            # second are drawn within the virtual time budget.
            for _ in range(2):
                subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                                "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
                                "--window-size=1300,760", "--run-all-compositor-stages-before-draw",
                                "--virtual-time-budget=60000", f"--screenshot={out}", f"{page}/model-metrics"],
                               check=True, capture_output=True, timeout=300)
            print(f"saved {out}")
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
