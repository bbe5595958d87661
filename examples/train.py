"""A tiny "training" script: fits y = 2x + 1 by gradient descent and saves the model to ./outputs."""

import argparse
import json
import os

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--lr", type=float, default=0.05)
args = parser.parse_args()

data = [(x / 10, 2 * x / 10 + 1) for x in range(20)]
w, b = 0.0, 0.0
for epoch in range(1, args.epochs + 1):
    for _ in range(50):
        gw = sum(2 * (w * x + b - y) * x for x, y in data) / len(data)
        gb = sum(2 * (w * x + b - y) for x, y in data) / len(data)
        w, b = w - args.lr * gw, b - args.lr * gb
    loss = sum((w * x + b - y) ** 2 for x, y in data) / len(data)
    print(f"epoch {epoch}: loss {loss:.5f}  w={w:.3f} b={b:.3f}", flush=True)

os.makedirs("outputs", exist_ok=True)
with open("outputs/model.json", "w") as f:
    json.dump({"w": w, "b": b, "loss": loss}, f)
print(f"saved outputs/model.json (run {os.environ.get('LABRUN_RUN_ID')})")
